"""sage_ft.models"""
