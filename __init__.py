"""Counterpoint: an LLM inference server where output quality is a first-class feature."""

__version__ = "0.1.0"
