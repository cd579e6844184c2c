"""Shared fixtures of the serving area (owned by that area)."""
