"""Incremental detokenization with stop strings, as a serving front end needs it.

Tokens arrive in blocks (one block per speculative step). `TextStream.push` returns the text that
is now final: it holds back an incomplete UTF-8 character (decoded as U+FFFD) and any tail that
could still grow into a stop string, and cuts the text at the first stop string, which is not
part of the output (OpenAI semantics).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TextStream:
    tokenizer: object
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    emitted: str = ""  # text already returned
    stopped: bool = False  # a stop string matched; nothing more will be emitted

    def push(self, new_ids: list[int]) -> str:
        """Add generated tokens; return the newly final text (possibly empty)."""
        if self.stopped:
            return ""
        self.token_ids.extend(new_ids)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = _first_stop(text, self.stop, start=max(0, len(self.emitted) - _longest(self.stop)))
        if cut is not None:
            self.stopped = True
            return self._advance(text[:cut])
        final = len(text.rstrip("\ufffd"))  # an incomplete multi-byte character is not final yet
        final = min(final, len(text) - _stop_prefix_len(text, self.stop))
        return self._advance(text[:final])

    def finish(self) -> str:
        """The held-back tail at the end of generation (no stop string can complete any more)."""
        if self.stopped:
            return ""
        return self._advance(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


def _longest(stop: tuple[str, ...]) -> int:
    return max((len(s) for s in stop), default=0)


def _first_stop(text: str, stop: tuple[str, ...], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
