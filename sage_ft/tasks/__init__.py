"""sage_ft.tasks"""
