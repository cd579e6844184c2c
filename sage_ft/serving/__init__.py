"""sage_ft.serving"""
