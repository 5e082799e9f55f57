"""The OpenAI-compatible HTTP API: FastAPI routes, request bodies, streaming, response shapes,
errors, metrics, and the async client of the engine thread."""
