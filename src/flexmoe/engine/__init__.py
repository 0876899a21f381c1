"""Engines: thin shells that move method messages between clients and the server."""
