"""Shared fixtures of the webui area (owned by that area)."""
