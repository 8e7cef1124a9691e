"""Serving: continuous batching (batcher.py), the speech service (service.py) and its OpenAI-compatible HTTP server
(server.py)."""
