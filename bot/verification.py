"""Is this request Slack's? Checked at the HTTP door, on the raw bytes, before anything parses it.

Slack signs every request: `X-Slack-Signature: v0=HMAC-SHA256(signing secret, "v0:{timestamp}:{body}")`
with `X-Slack-Request-Timestamp` the time it was sent, and asks apps to refuse anything older than
5 minutes (https://api.slack.com/authentication/verifying-requests-from-slack). The door refuses, in
this order and each before the next step's work:

1. 401: no signature, a timestamp that is not a Unix time, or one more than 5 minutes off (the body
   is not read at all);
2. 413: a body over MAX_BODY_BYTES (a declared Content-Length is refused before reading; a streamed
   body is read only up to the cap);
3. 401: a signature that does not match the body;
4. 401: a signature already used (a replay). Slack signs each delivery when it sends it, retries
   included: a retry carries `X-Slack-Retry-Num` and the time it was sent, so (unless it follows within
   the same second) a new signature, and a copy of an earlier request is what arrives with a signature
   the door has seen. 401 rather than 200: Slack's own requests are not refused by it, and a copy is an
   attack worth seeing in the logs. The one exception is an Events API delivery marked as a retry
   (bot.server.SlackDoor): it passes, and retried events are deduplicated by `event_id` further in
   (bot.questions), persisted, so it never answers twice.

Only then is the body parsed; a verified body that is not the JSON or form Slack sends is 400.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import threading
import time
import urllib.parse

# Slack's payloads are a few KiB. The largest it sends us is an event about a long message: its text (at most
# 40,000 characters) twice, as text and as blocks, a few hundred KiB even escaped. 1 MiB leaves room for that
# and bounds what one request costs the server.
MAX_BODY_BYTES = 1024 * 1024
# Slack's replay window: a request whose timestamp is further than this from now is refused.
MAX_AGE_S = 5 * 60
# Signatures remembered for replay refusal. Only verified signatures are kept, so filling this takes more
# than 50,000 genuine Slack requests within 5 minutes (~170/s, far beyond one workspace's bot); past that,
# the soonest-expiring ones are forgotten first. 12 MiB at the bound (measured with tracemalloc).
MAX_REMEMBERED_SIGNATURES = 50_000


class Refused(Exception):
    """A request the door turns away: the HTTP status and what was wrong (said to the caller)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def request_timestamp(headers, *, now: float) -> tuple[int, str]:
    """(timestamp, signature) from the headers; Refused(401) when either is missing, malformed or stale."""
    signature = headers.get("x-slack-signature")
    raw = headers.get("x-slack-request-timestamp")
    if not signature or raw is None:
        raise Refused(401, "unsigned request: X-Slack-Signature and X-Slack-Request-Timestamp are required")
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit():
        raise Refused(401, f"X-Slack-Request-Timestamp must be a Unix time in seconds, not {raw[:20]!r}")
    timestamp = int(raw)
    if abs(now - timestamp) > MAX_AGE_S:
        raise Refused(401, "X-Slack-Request-Timestamp is more than 5 minutes from now")
    return timestamp, signature


async def read_body(request, *, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, read until `limit`; Refused(413) as soon as it is known to be larger (nothing more is read)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise Refused(400, f"Content-Length must be a number of bytes, not {declared[:20]!r}")
        if int(declared) > limit:
            raise Refused(413, f"body of {int(declared)} bytes; Slack's requests are at most {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"body over {limit} bytes; Slack's requests are smaller")
        chunks.append(chunk)
    return b"".join(chunks)


def check_signature(secret: str, body: bytes, timestamp: int, signature: str) -> None:
    expected = "v0=" + hmac.new(secret.encode(), b"v0:%d:" % timestamp + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise Refused(401, "X-Slack-Signature does not match the body (wrong signing secret?)")


class RecentSignatures:
    """Signatures seen within Slack's replay window; a second use of one is refused."""

    def __init__(self, *, max_size: int = MAX_REMEMBERED_SIGNATURES, clock=time.time):
        self.max_size = max_size
        self._clock = clock
        self._lock = threading.Lock()
        self._expires: dict[str, float] = {}  # signature -> when its timestamp leaves the window
        self._heap: list[tuple[float, str]] = []

    def check_fresh(self, signature: str, timestamp: int) -> None:
        """Remember `signature`; Refused(401) if it was seen before and its window has not passed."""
        now = self._clock()
        with self._lock:
            while self._heap and (self._heap[0][0] < now or len(self._heap) > self.max_size):
                _, old = heapq.heappop(self._heap)
                self._expires.pop(old, None)
            if signature in self._expires:
                raise Refused(401, "replayed request: this signature was already used")
            expires = timestamp + MAX_AGE_S
            self._expires[signature] = expires
            heapq.heappush(self._heap, (expires, signature))

    def __len__(self) -> int:
        return len(self._expires)


class SlackBody:
    """A verified body, parsed as bolt will parse it; Refused(400) for anything Slack does not send."""

    def __init__(self, body: bytes, content_type: str | None):
        try:
            self.text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused(400, "body is not UTF-8") from None
        self.payload: dict = self._parse(self.text, (content_type or "").lower())

    @staticmethod
    def _parse(text: str, content_type: str) -> dict:
        # The same choice bolt makes (slack_bolt.request.internals.parse_body), so both read the same payload.
        if content_type.split(";")[0].strip() == "application/json" or text.startswith("{"):
            data = _json_object(text, "JSON body")
            if data.get("type") == "event_callback" and (not isinstance(data.get("event_id"), str)
                                                        or not isinstance(data.get("event"), dict)):
                raise Refused(400, "event_callback without an event_id string and an event object")
            return data
        try:
            form = urllib.parse.parse_qs(text, keep_blank_values=True, strict_parsing=bool(text))
        except ValueError:
            raise Refused(400, "body is neither JSON nor a form") from None
        if "payload" in form:
            return _json_object(form["payload"][0], "the form field `payload`")
        return {k: v[0] for k, v in form.items()}

    @property
    def is_event_callback(self) -> bool:
        return self.payload.get("type") == "event_callback"


def _json_object(text: str, what: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise Refused(400, f"{what} is not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(data, dict):
        raise Refused(400, f"{what} must be a JSON object, not {type(data).__name__}")
    return data
