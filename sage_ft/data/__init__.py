"""sage_ft.data"""
