"""The inference server: the engine and its rooms (engine/, attention/, models/, api/, bench/),
the offline API (`LLM`) and the command line.

`LLM` is imported on first use, so `counterpoint --help` and the light modules do not pay for
torch and transformers.
"""

__all__ = ["LLM"]


def __getattr__(name: str):
    if name == "LLM":
        from counterpoint.serving.llm import LLM

        return LLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
