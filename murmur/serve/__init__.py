"""Serving: the OpenAI-compatible HTTP API, its metrics and the web chat page."""
