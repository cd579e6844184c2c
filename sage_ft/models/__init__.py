"""Base models: the built-in demo model (``demo``) and resolution of names/paths (``resolve``)."""
