"""Shared fixtures of the training area (owned by that area)."""
