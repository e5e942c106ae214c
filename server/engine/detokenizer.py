"""Incremental detokenization with stop strings.

Tokens arrive one at a time; text leaves in deltas that never split a
multi-byte character and never contain a stop string:

    tokens      ... [ 'Par' ] [ 'is' ] [ '.' ] [ '\\n' ]      stop = ['.\\n']
    emitted     ... 'Par'     'is'     ''      -> stop, '.' withheld then dropped

Decoding is windowed (vLLM's prefix/read offsets): only the last few tokens
are decoded each step, so the cost per token stays constant.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        # Keep a few prompt tokens as context: some tokenizers drop a leading
        # space when a token is decoded alone.
        self.ids: list[int] = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all output text so far (stop string excluded once found)
        self.sent = 0  # characters of self.text already handed out
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def add(self, token: int) -> tuple[str, bool]:
        """Append one token; returns (new text to emit, stop string found)."""
        self.ids.append(token)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        stopped = False
        if self.stop:
            # Sent text is always `holdback` characters short of the end, so
            # a stop string can only begin in text not sent yet.
            hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                stopped = True
        limit = len(self.text) if stopped else max(self.sent, len(self.text) - self.holdback)
        delta = self.text[self.sent : limit]
        self.sent = limit
        return delta, stopped

    def flush(self) -> str:
        """Text withheld for a possible stop string, once the request ends otherwise."""
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta
