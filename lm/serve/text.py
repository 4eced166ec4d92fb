"""Incremental detokenization with stop strings, for one generated sequence (no Ray, no torch).

    text = RowText(tokenizer, stop=["\\n\\n"])
    for token in tokens:
        new, stopped = text.add(token)     # text to release now; whether a stop string was found
    rest, stopped = text.finish()          # flush what was held back
"""

from __future__ import annotations

from lm.tokenizer import BPETokenizer


class RowText:
    """Incremental detokenization + stop strings for one row.

    Text is decoded over a small window of recent tokens (vLLM's prefix/read offsets) and released
    only when it ends on a whole character; the longest tail that could begin a stop string is held
    back until it either completes one (then cut there) or cannot any more. ``finish`` flushes.
    """

    def __init__(self, tokenizer: BPETokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to the end of self.done
        self.done = ""  # the text of ids[:read], which ends on a whole character
        self.text = ""  # done + the whole characters decoded after it (cut at a stop string once found)
        self.sent = 0  # characters of self.text already released

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; return (text to release now, whether a stop string was found)."""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        new = self.tok.decode(self.ids[self.prefix :])[len(before) :]
        if new and not new.endswith("\ufffd"):
            self.done += new
            self.prefix, self.read = self.read, len(self.ids)
            self.text = self.done
        else:  # a character still in pieces: what precedes it is final, so stop strings can match it now
            self.text = self.done + new.rstrip("\ufffd")
        return self._release(final=False)

    def finish(self) -> tuple[str, bool]:
        """Flush everything held back (a trailing partial character decodes as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix : self.read])
        self.done += self.tok.decode(self.ids[self.prefix :])[len(before) :]
        self.prefix = self.read = len(self.ids)
        self.text = self.done
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            out, self.sent = self.text[self.sent :], len(self.text)
            return out, True
        end = len(self.text)
        if not final:
            pending = self.text[self.sent :]
            for k in range(min(len(pending), self.longest - 1), 0, -1):
                if any(s.startswith(pending[-k:]) for s in self.stop):
                    end -= k
                    break
        out, self.sent = self.text[self.sent : end], end
        return out, False
