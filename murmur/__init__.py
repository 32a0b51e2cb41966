"""Murmur: turn a social network's own posts into a chatbot, and serve it."""

__version__ = "0.1.0"
