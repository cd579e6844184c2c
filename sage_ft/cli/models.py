"""CLI commands: models and gpu; see COMMAND_MODULES in sage_ft/cli/__init__.py. (Filled in by the module's owner.)"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's commands to the `sage-ft` parser."""
