"""The engine, its offline API and the server."""

from counterpoint.serving.llm import LLM

__all__ = ["LLM"]
