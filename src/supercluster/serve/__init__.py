"""Serving: import real models into run directories; the inference engine and its OpenAI-compatible API."""
