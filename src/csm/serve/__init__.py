"""Serving: continuous batching (batcher.py) and the OpenAI-compatible HTTP server (server.py)."""
