import sys

from sage_ft.cli import main

sys.exit(main())
