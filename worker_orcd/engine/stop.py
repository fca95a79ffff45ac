"""Stop sequences matched on the decoded text, which is never emitted past them.

Matching text rather than token ids catches a stop string however the model happened to
tokenize it. Text that could still be the start of a stop string is held back until the next
token decides it.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Feed new text; returns the text now safe to emit and the stop string matched, if any."""
        self.pending += text
        if not self.stops:
            emitted, self.pending = self.pending, ""
            return emitted, None
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            at, stop = min(hits)
            emitted, self.pending = self.pending[:at], ""
            return emitted, stop
        keep = self._longest_stop_prefix_suffix()
        emitted = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(emitted) :]
        return emitted, None

    def flush(self) -> str:
        """At the end of generation, held-back text turned out not to be a stop: emit it."""
        emitted, self.pending = self.pending, ""
        return emitted

    def _longest_stop_prefix_suffix(self) -> int:
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:length]):
                    best = length
                    break
        return best
