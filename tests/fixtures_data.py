"""Shared fixtures of the data area (owned by that area)."""
