"""Shared fixtures of the tasks area (owned by that area)."""
