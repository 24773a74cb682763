"""One answer's message in a Slack thread, streamed as the engine writes it.

    stream = AnswerStream(client, channel=C, thread_ts=T, recipient_user_id=U, recipient_team_id=TEAM).start()
    answer = engine.answer(question, on_text=stream.feed)      # feed() is called from the generation thread
    ts = stream.finish(answer.text, tail_blocks=..., full_blocks=..., fallback_text=...)

Slack's streaming methods (https://docs.slack.dev/reference/methods/chat.startStream): chat.startStream
opens the message with the first text, chat.appendStream adds to it, chat.stopStream ends it and adds
blocks under the text (our sources and the feedback_up / feedback_down buttons). slack_sdk's `chat_stream`
helper (ChatStream) makes those calls; it buffers by size only (256 characters by default), so here it gets
buffer_size=1 and the pacing is ours: whatever text the engine produced since the last update goes in one
call, and no message is updated more often than once per `interval_s` (0.5 s: Slack rate-limits message
updates per channel). feed() only appends to a buffer under a lock: the generation thread never waits on
Slack. A background thread makes the calls.

Where streaming is refused (chat.startStream answers an error: an older workspace, a plan or a surface
without it), the message falls back to what kbloop did before streaming: a "Looking that up…" placeholder
(chat.postMessage) replaced by the whole answer (chat.update). If the streamed text ever differs from the
final answer (the engine guarantees it does not; a Slack error in the middle could), the message is
repaired with chat.update after the stream stops, so nothing is lost.

Streamed text is standard markdown (markdown_text), escaped by bot.blocks.escape_markdown: nothing the
model writes can ping anyone or forge a link. Text is sent only once its escaping cannot change
(bot.blocks.settled_markdown_length), so the escaped pieces always extend each other.
"""

from __future__ import annotations

import logging
import threading
import time

from slack_sdk.errors import SlackApiError

import bot.blocks as blocks
import bot.messages as messages

log = logging.getLogger("kbloop.bot")

MIN_UPDATE_INTERVAL_S = 0.5  # at most one startStream / appendStream / stopStream per message per this
MAX_MARKDOWN_CHARS = 12000  # markdown_text per call (Slack's limit); a longer rest goes by chat.update


class AnswerStream:
    """Streams one answer into a thread; falls back to placeholder + chat.update where streaming is refused."""

    def __init__(self, client, *, channel: str, thread_ts: str, recipient_user_id: str | None = None,
                 recipient_team_id: str | None = None, interval_s: float = MIN_UPDATE_INTERVAL_S,
                 whole_as_one_message: bool = True, clock=time.monotonic, sleep=time.sleep):
        self.client = client
        self.channel = channel
        self.thread_ts = thread_ts
        self.recipient_user_id = recipient_user_id
        self.recipient_team_id = recipient_team_id
        self.interval_s = interval_s
        # An answer that arrives whole (nothing streamed): one chat.postMessage, or, while it is not known that
        # the workspace streams, today's placeholder + chat.update.
        self.whole_as_one_message = whole_as_one_message
        self.clock = clock
        self.sleep = sleep
        self.sent = ""  # escaped markdown already in the message
        self.ts: str | None = None  # the message, once Slack created it
        self.refused: str | None = None  # Slack's error when chat.startStream was refused
        self.broken = False  # an append failed after the start: the rest goes with the final repair
        self.updates: list[float] = []  # clock() of every call that changed the message (benchmarks)
        self.first_text_at: float | None = None  # clock() when the first streamed text reached Slack
        self._raw = ""  # answer text fed so far, unescaped
        self._stream = None  # slack_sdk ChatStream
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def streamed(self) -> bool:
        """Slack accepted chat.startStream for this message."""
        return self._stream is not None and self._stream.ts is not None

    # --- the generation side ---------------------------------------------------------------------------

    def feed(self, piece: str) -> None:
        """More of the answer (any thread; never blocks on Slack)."""
        with self._cond:
            self._raw += piece
            self._cond.notify()

    # --- the Slack side -------------------------------------------------------------------------------

    def start(self) -> AnswerStream:
        self._thread = threading.Thread(target=self._run, name="kbloop-stream", daemon=True)
        self._thread.start()
        return self

    def pending(self) -> str:
        """Escaped text that can be sent now (settled, not sent yet)."""
        with self._cond:
            raw = self._raw[:blocks.settled_markdown_length(self._raw)]
        escaped = blocks.escape_markdown(raw.strip())  # the final text is stripped: hold back trailing spaces
        piece = escaped[len(self.sent):] if escaped.startswith(self.sent) else ""
        return "" if len(piece) > MAX_MARKDOWN_CHARS else piece  # too long for one call: the final update has it

    def wait_s(self) -> float:
        """Seconds until this message may be updated again (0: now)."""
        if not self.updates:
            return 0.0
        return max(0.0, self.updates[-1] + self.interval_s - self.clock())

    def pump(self) -> bool:
        """Send what is pending if the message may be updated now; True if a call was made."""
        if self.refused or self.broken or self.wait_s() > 0:
            return False
        piece = self.pending()
        if not piece:
            return False
        self._send(piece)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed or self.refused or self.broken:
                    return
                wait = self.wait_s()
                if wait > 0 or not self.pending():
                    self._cond.wait(wait if wait > 0 else None)
                    continue
            self.pump()

    def _send(self, piece: str) -> None:
        try:
            if self._stream is None:
                self._stream = self.client.chat_stream(
                    channel=self.channel, thread_ts=self.thread_ts, recipient_user_id=self.recipient_user_id,
                    recipient_team_id=self.recipient_team_id, buffer_size=1)
            self._stream.append(markdown_text=piece)
        except SlackApiError as exc:
            self._stream_failed(exc)
            return
        self._sent(piece)

    def _sent(self, piece: str) -> None:
        now = self.clock()
        with self._cond:
            self.sent += piece
            self.ts = self.ts or (self._stream.ts if self._stream is not None else None)
            self.updates.append(now)
            if self.first_text_at is None and piece:
                self.first_text_at = now

    def _stream_failed(self, exc: SlackApiError) -> None:
        error = str(exc.response.get("error") if exc.response is not None else exc)
        if self._stream is None or self._stream.ts is None:
            # chat.startStream refused: today's placeholder, replaced by the whole answer at the end.
            log.info("streaming refused in %s (%s): placeholder + chat.update", self.channel, error)
            self.refused = error
            self._post_placeholder()
        else:
            log.warning("chat.appendStream failed in %s (%s): the final update carries the rest", self.channel, error)
            self.broken = True

    def _post_placeholder(self) -> None:
        response = self.client.chat_postMessage(channel=self.channel, thread_ts=self.thread_ts, text=messages.WORKING)
        self.ts = response["ts"]
        self.updates.append(self.clock())

    def close(self) -> None:
        """Stop the background sender (what it has not sent goes with finish())."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def finish(self, text: str, *, tail_blocks: list[dict], full_blocks: list[dict], fallback_text: str,
               on_ts=None) -> str:
        """End the message with the whole answer `text`: the rest of the text and `tail_blocks` (sources,
        buttons) through chat.stopStream; or, where streaming was refused, `full_blocks` through chat.update
        of the placeholder. `on_ts(ts)` is called once the message's ts is known, before its buttons appear
        where it already exists. Returns the message's ts."""
        self.close()
        if self.ts is not None and on_ts is not None:
            on_ts(self.ts)
            on_ts = None
        final = blocks.escape_markdown(text.strip()) or "…"
        todays_flow = bool(self.refused)  # placeholder (posted already, or now) replaced by the answer
        if not self.refused and self._stream is None:
            # Nothing was streamed (a verified answer, a refused question, the model still loading): the answer
            # is whole already, so it goes as one message (a stream would be two calls at once: start and stop).
            if self.whole_as_one_message:
                self.ts = self.client.chat_postMessage(channel=self.channel, thread_ts=self.thread_ts,
                                                       text=fallback_text, blocks=full_blocks)["ts"]
                self._sent(final)
                if on_ts is not None:
                    on_ts(self.ts)
                return self.ts
            todays_flow = True
        if not todays_flow:  # the stream is open: end it (a Slack error here reaches the caller, who reports it)
            self.sleep(self.wait_s())
            repair = (self.broken or not final.startswith(self.sent)
                      or len(final) - len(self.sent) > MAX_MARKDOWN_CHARS)
            rest = "" if repair else final[len(self.sent):]
            self._stream.stop(markdown_text=rest or None, blocks=tail_blocks)
            self._sent(rest)
            if repair:
                log.warning("streamed text in %s differs from the answer: replacing it", self.channel)
                self.sleep(self.wait_s())
                self.client.chat_update(channel=self.channel, ts=self.ts, text=fallback_text, blocks=full_blocks)
                self.updates.append(self.clock())
            if on_ts is not None:
                on_ts(self.ts)
            return self.ts
        placeholder_now = self.ts is None
        if placeholder_now:  # refused at the very end: today's placeholder, then the answer
            self._post_placeholder()
        if on_ts is not None:
            on_ts(self.ts)
        if not placeholder_now:
            self.sleep(self.wait_s())
        self.client.chat_update(channel=self.channel, ts=self.ts, text=fallback_text, blocks=full_blocks)
        self.updates.append(self.clock())
        return self.ts


class StreamingSupport:
    """Whether to try streaming: after chat.startStream was refused, answers go straight to placeholder +
    chat.update (no failed call per question) until `retry_after_s` has passed; then streaming is tried again."""

    def __init__(self, *, retry_after_s: float = 600.0, clock=time.monotonic):
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.refused_at: float | None = None
        self.error: str | None = None

    def allowed(self) -> bool:
        return self.refused_at is None or self.clock() - self.refused_at >= self.retry_after_s

    def refused(self, error: str) -> None:
        self.refused_at, self.error = self.clock(), error

    works = False  # a stream was started in this workspace: whole answers can go as one message
