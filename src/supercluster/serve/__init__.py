"""Serving: models imported from the formats people have, and (elsewhere in this package)
the inference engine and its OpenAI-compatible API."""
