"""Tidings: a Trio WebSocket daemon that delivers messages to users."""

__version__ = "0.1.0"
