"""Thin launcher: ``python webui.py [--share] [--lang zh] ...`` (see ``sage_ft.webui.app``)."""

import sys

from sage_ft.webui.launch import main

if __name__ == "__main__":
    sys.exit(main())
