"""Turning a stream of token ids into a stream of text: whole characters only, stop strings cut out.

A byte-level BPE token may hold part of a multi-byte UTF-8 character; the decoder then yields
U+FFFD. `IncrementalDetokenizer` holds such a tail back until the character completes. `StopMatcher`
holds back the last few characters that could still become a stop string, so a streamed reply never
shows the start of a stop string it later cuts.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decode tokens one at a time, returning only text made of complete characters."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        # Text of tokens[prefix:read] was already returned; decoding restarts from `prefix` so that
        # a character split across tokens decodes whole.
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append a token; return the new complete text (possibly empty)."""
        self.tokens.append(token)
        seen = self._decode(self.tokens[self.prefix:self.read])
        full = self._decode(self.tokens[self.prefix:])
        if full.endswith(REPLACEMENT) or len(full) < len(seen):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return full[len(seen):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        seen = self._decode(self.tokens[self.prefix:self.read])
        full = self._decode(self.tokens[self.prefix:])
        self.prefix = self.read = len(self.tokens)
        return full[len(seen):]


class StopMatcher:
    """Find stop strings in streamed text; release only text that cannot become part of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to show now, whether a stop string was found)."""
        self.text += delta
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.emitted:end]
            self.text = self.text[:end]
            self.emitted = end
            return out, True
        safe = len(self.text) - self._held()
        out = self.text[self.emitted:safe]
        self.emitted = safe
        return out, False

    def _held(self) -> int:
        """Length of the longest unreleased tail that is the start of a stop string."""
        room = len(self.text) - self.emitted
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, room), best, -1):
                if self.text.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """The held-back tail, once the output has ended without a stop string."""
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out
