"""Incremental detokenization that never emits a broken UTF-8 character, and stop strings.

Text is produced by decoding a short window of ids twice (with and without the newest tokens)
and emitting the difference, so a multi-byte character split over tokens waits until complete.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

# Prompt tokens kept as left context, so a word-initial space decodes the same as in a full decode.
CONTEXT_TOKENS = 6


def ids_decoder(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """The tokenizer's decode. When transformers would add nothing to the Rust tokenizer's own
    decode (no clean-up of spaces), that is called directly: a quarter of the cost per call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)


@dataclass(slots=True)
class IncrementalDetokenizer:
    decode: Callable[[list[int]], str]
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    @classmethod
    def for_prompt(cls, tokenizer, prompt_ids: list[int], skip_special_tokens: bool) -> "IncrementalDetokenizer":
        ids = list(prompt_ids[-CONTEXT_TOKENS:])
        return cls(ids_decoder(tokenizer, skip_special_tokens), ids, 0, len(ids))

    def fork(self) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self.decode, list(self.ids), self.prefix_offset, self.read_offset)

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        prefix_text, new_text = self._window_texts()
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end of output: whatever text is still held back, broken characters included."""
        prefix_text, new_text = self._window_texts()
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]

    def _window_texts(self) -> tuple[str, str]:
        return self.decode(self.ids[self.prefix_offset : self.read_offset]), self.decode(self.ids[self.prefix_offset :])


def find_stop(text: str, num_new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends inside the last num_new_chars characters.

    Returns (index where it starts, the stop string), or None.
    """
    best = None
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best
