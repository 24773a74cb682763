"""Answer text as callers get it, whole (`clean_answer`) and streamed piece by piece (`TextStream`).

A streamed answer's pieces only ever extend what was sent: text that may still change (a character whose
bytes are not all generated yet, trailing spaces, the start of a chat marker) is held back until the next
token settles it, so the pieces put together are exactly the final answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

# Chat markers that end an answer if they survive decoding as plain text.
END_MARKERS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")


def clean_answer(text: str) -> str:
    """A decoded answer as callers get it: special tokens are already skipped; a chat marker that survives as
    plain text ends the answer; no surrounding whitespace."""
    for marker in END_MARKERS:
        text = text.split(marker)[0]
    return text.strip()


def settled_text(text: str) -> str:
    """The part of a partly generated answer (decoded so far) that no later token can change in
    `clean_answer`'s result: without a trailing incomplete character (decoded as U+FFFD), a tail that may
    still become a chat marker, and trailing whitespace (stripped at the end unless more text follows)."""
    for marker in END_MARKERS:
        text = text.split(marker)[0]
    text = text.lstrip().rstrip("\ufffd")
    held = max((k for marker in END_MARKERS for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)
    return text[:len(text) - held].rstrip()


class TextStream:
    """One answer's streaming consumer: fed the answer's token ids after each step, it sends the consumer only
    text that extends what it sent before, so that the pieces put together are the final answer."""

    def __init__(self, decode: Callable[[list[int]], str], consumer: Callable[[str], None]):
        self.decode = decode
        self.consumer = consumer
        self.sent = ""
        self.failed = False  # the consumer raised: it gets nothing more

    def update(self, ids: list[int]) -> None:
        if self.failed:
            return
        settled = settled_text(self.decode(ids))
        # A decode that changed text already sent (not seen with byte-level BPE) waits for the final text.
        if len(settled) > len(self.sent) and settled.startswith(self.sent):
            self._send(settled[len(self.sent):])
            self.sent = settled

    def finish(self, final: str) -> None:
        """Send what remains of the final answer (the caller gets `final` as Answer.text)."""
        if self.failed:
            return
        if final.startswith(self.sent):
            if len(final) > len(self.sent):
                self._send(final[len(self.sent):])
                self.sent = final
        else:
            log.warning("engine: streamed text is not a prefix of the final answer; the caller repairs it")

    def _send(self, piece: str) -> None:
        try:
            self.consumer(piece)
        except Exception:  # a consumer's failure must not stop the batch
            log.exception("engine: a streaming consumer failed; it gets no more text")
            self.failed = True
