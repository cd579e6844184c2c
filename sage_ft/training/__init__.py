"""sage_ft.training"""
