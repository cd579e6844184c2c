"""sage_ft.webui"""
