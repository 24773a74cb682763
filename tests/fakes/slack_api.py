"""A fake Slack: a real HTTP server on loopback that plays Slack's Web API, plus request signing.

Used by every test that talks to Slack (the bot's own tests, jobs end to end, `kbloop serve`):

    with FakeSlackAPI() as slack:
        client = WebClient(token="xoxb-test", base_url=slack.url)
        ...
        posted = slack.wait_for("chat.postMessage", 1, timeout=10)   # poll, never sleep
        assert posted[0].params["thread_ts"] == "1700000000.000100"

Requests to the bot are signed as Slack signs them (v0 HMAC-SHA256 of "v0:{timestamp}:{body}"):

    body = event_body(app_mention_event(text="<@UBOT> how do I ...?"))
    status, text = post_signed(f"{bot_url}/slack/events", body, SIGNING_SECRET, retry_num=1)

What the fake checks like Slack does (so a test fails where Slack would refuse): a bearer token on
Web API calls, Block Kit limits (50 blocks, 3,000 characters per section text, 2,000 per button value),
`chat.update` of a message that does not exist. `fail_next(method, status=429, retry_after=1)`
answers the next call(s) of a method with Slack's rate-limit response.

The AI-app surface (https://docs.slack.dev/ai/): `FakeSlackAPI(streaming=True)` plays a workspace with
chat.startStream / chat.appendStream / chat.stopStream (a streamed message collects its markdown_text and
chunks; recipient_user_id and recipient_team_id are required outside DMs; only a message still streaming
takes appends; the 12,000-character limit per call). By default the fake is a workspace without
streaming: chat.startStream answers `unknown_method`, as Slack does for a method it does not offer, so
every test that does not ask for streaming sees the placeholder + chat.update fallback.
`stream_updates(channel, ts)` gives the times of the calls that changed a streamed message.
assistant.threads.setStatus / setSuggestedPrompts / setTitle are checked for their required arguments
and limits (at most 4 suggested prompts, each with a title and a message; at most 10 loading messages).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BOT_USER_ID = "UBOT"
BOT_ID = "BBOT"
TEAM_ID = "T0FAKE"
API_APP_ID = "A0FAKE"

# Block Kit limits: https://api.slack.com/reference/block-kit/blocks
MAX_BLOCKS = 50
MAX_SECTION_TEXT = 3000
MAX_BUTTON_VALUE = 2000
MAX_MESSAGE_TEXT = 40000
MAX_MARKDOWN_TEXT = 12000  # markdown_text per chat.*Stream call
MAX_SUGGESTED_PROMPTS = 4
MAX_LOADING_MESSAGES = 10


@dataclass
class RecordedRequest:
    """One call the fake received. `params` merges query, form and JSON body; JSON-in-form fields
    (blocks, view, attachments) are decoded so tests can look inside them."""

    method: str  # the Web API method ("chat.postMessage") or "response_url:<name>"
    params: dict[str, Any]
    headers: dict[str, str]
    body: bytes
    received_at: float = field(default_factory=time.time)


@dataclass
class _Failure:
    status: int
    retry_after: int | None
    error: str
    times: int


def _norm(path: str) -> str:
    """'/api/chat.postMessage', 'api/chat.postMessage', 'chat.postMessage' -> 'chat.postMessage'."""
    path = path.split("?", 1)[0].lstrip("/")
    return path.removeprefix("api/")


def block_errors(blocks: Any) -> list[str]:
    if blocks is None:
        return []
    if not isinstance(blocks, list):
        return ["blocks must be a list"]
    errors = []
    if len(blocks) > MAX_BLOCKS:
        errors.append(f"{len(blocks)} blocks (max {MAX_BLOCKS})")
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or "type" not in block:
            errors.append(f"block {i} has no type")
            continue
        text = block.get("text")
        if block["type"] == "section" and isinstance(text, dict) and len(text.get("text", "")) > MAX_SECTION_TEXT:
            errors.append(f"block {i}: section text of {len(text['text'])} characters (max {MAX_SECTION_TEXT})")
        for el in block.get("elements", []) if block["type"] == "actions" else []:
            if len(str(el.get("value", ""))) > MAX_BUTTON_VALUE:
                errors.append(f"block {i}: button value too long")
    return errors


class FakeSlackAPI:
    """Slack's Web API on 127.0.0.1, recording every request. Start with `with` or `.start()`."""

    def __init__(self, *, bot_user_id: str = BOT_USER_ID, bot_id: str = BOT_ID, team_id: str = TEAM_ID,
                 host: str = "127.0.0.1", port: int = 0, require_token: bool = True, streaming: bool = False):
        self.streaming = streaming
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.team_id = team_id
        self.require_token = require_token
        self._host, self._port = host, port
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._failures: dict[str, list[_Failure]] = {}
        self._overrides: dict[str, dict] = {}
        self._messages: dict[tuple[str, str], dict] = {}
        self._ts = itertools.count(100)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle ------------------------------------------------------------------------------------
    def start(self) -> FakeSlackAPI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: tests read .requests() instead
                pass

            def do_GET(self):
                self._handle()

            def do_POST(self):
                self._handle()

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, payload = fake._dispatch(self.path, dict(self.headers.items()), body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer((self._host, self._port), Handler)
        self._server.daemon_threads = True
        # stop() waits for serve_forever's next look at its shutdown flag: every 10 ms, as nearly every test of
        # the bot starts and stops one of these.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01},
                                        name="fake-slack", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeSlackAPI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server, "FakeSlackAPI is not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """Base URL for `WebClient(base_url=...)` / KBLOOP_SLACK_API_URL (ends with /api/ like Slack's)."""
        return f"http://127.0.0.1:{self.port}/api/"

    def response_url(self, name: str = "default") -> str:
        """A response_url for slash-command and interactive payloads; calls to it are recorded as
        method 'response_url:<name>' (and under 'response_url' for any name)."""
        return f"http://127.0.0.1:{self.port}/response/{name}"

    # Inspection -----------------------------------------------------------------------------------
    def requests(self, method: str | None = None) -> list[RecordedRequest]:
        """Recorded requests, oldest first; `method` 'chat.postMessage' (or '/api/chat.postMessage'),
        'response_url' (any response URL) or 'response_url:<name>'."""
        with self._lock:
            if method is None:
                return list(self._requests)
            m = _norm(method)
            if m == "response_url":
                return [r for r in self._requests if r.method.startswith("response_url:")]
            return [r for r in self._requests if r.method == m]

    def wait_for(self, method: str, n: int = 1, timeout: float = 10.0) -> list[RecordedRequest]:
        """Wait until at least `n` requests of `method` arrived; return them. AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                got = self.requests(method)
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = sorted({r.method for r in self._requests})
                    raise AssertionError(f"expected {n} {method} request(s) within {timeout}s, got {len(got)}; "
                                         f"methods seen: {seen}")
                self._lock.wait(min(left, 0.05))

    def messages(self, channel: str | None = None) -> list[dict]:
        """Messages as they stand now (after chat.update), oldest first: {channel, ts, thread_ts, text, blocks, ...}."""
        with self._lock:
            msgs = [dict(m) for (ch, _), m in self._messages.items() if channel is None or ch == channel]
        return sorted(msgs, key=lambda m: float(m["ts"]))

    def stream_updates(self, channel: str, ts: str) -> list[float]:
        """time.monotonic() of each startStream / appendStream / stopStream / chat.update of one message."""
        with self._lock:
            return list(self._messages.get((channel, ts), {}).get("updates", []))

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._failures.clear()
            self._overrides.clear()
            self._messages.clear()

    # Programming responses --------------------------------------------------------------------------
    def fail_next(self, method: str, *, status: int = 429, retry_after: int | None = 1, error: str = "ratelimited",
                  times: int = 1) -> None:
        """The next `times` calls of `method` fail: by default Slack's 429 with a Retry-After header."""
        with self._lock:
            self._failures.setdefault(_norm(method), []).append(_Failure(status, retry_after, error, times))

    def set_response(self, method: str, payload: dict) -> None:
        """Answer every call of `method` with `payload` (e.g. {"ok": False, "error": "channel_not_found"})."""
        with self._lock:
            self._overrides[_norm(method)] = payload

    # The server side ---------------------------------------------------------------------------------
    def _dispatch(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, Any]:
        params = _parse_params(path, headers, body)
        route = _norm(path)
        method = "response_url:" + route.removeprefix("response/") if route.startswith("response/") else route
        with self._lock:
            self._requests.append(RecordedRequest(method, params, headers, body))
            self._lock.notify_all()
            failures = self._failures.get(method)
            if failures:
                failure = failures[0]
                failure.times -= 1
                if failure.times <= 0:
                    failures.pop(0)
                extra = {"Retry-After": str(failure.retry_after)} if failure.retry_after is not None else {}
                return failure.status, extra, {"ok": False, "error": failure.error}
            if method in self._overrides:
                return 200, {}, self._overrides[method]
            if method.startswith("response_url:"):
                return 200, {}, {"ok": True}
            if self.require_token and not _bearer(headers, params):
                return 200, {}, {"ok": False, "error": "not_authed"}
            return 200, {}, self._answer(method, params)

    def _next_ts(self) -> str:
        return f"1700000000.{next(self._ts):06d}"

    def _answer(self, method: str, p: dict[str, Any]) -> dict:
        """Slack-shaped success responses for the methods kbloop uses; {"ok": true} for the rest."""
        if method == "auth.test":
            return {"ok": True, "url": "https://fake.slack.com/", "team": "Fake", "user": "kbloop",
                    "team_id": self.team_id, "user_id": self.bot_user_id, "bot_id": self.bot_id}
        if method in ("chat.postMessage", "chat.update", "chat.postEphemeral"):
            errors = block_errors(p.get("blocks"))
            if len(str(p.get("text") or "")) > MAX_MESSAGE_TEXT:
                errors.append("text too long")
            if errors:
                return {"ok": False, "error": "invalid_blocks", "errors": errors}
            if not p.get("channel"):
                return {"ok": False, "error": "channel_not_found"}
        if method == "chat.postMessage":
            ts = self._next_ts()
            message = {"channel": p["channel"], "ts": ts, "thread_ts": p.get("thread_ts"), "text": p.get("text"),
                       "blocks": p.get("blocks"), "user": self.bot_user_id, "bot_id": self.bot_id}
            self._messages[(p["channel"], ts)] = message
            return {"ok": True, "channel": p["channel"], "ts": ts, "message": message}
        if method == "chat.update":
            key = (p.get("channel"), p.get("ts"))
            if key not in self._messages:
                return {"ok": False, "error": "message_not_found"}
            self._messages[key].update({"text": p.get("text"), "blocks": p.get("blocks"), "edited": True})
            self._messages[key].setdefault("updates", []).append(time.monotonic())
            return {"ok": True, "channel": key[0], "ts": key[1], "text": p.get("text")}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": self._next_ts()}
        if method in ("chat.startStream", "chat.appendStream", "chat.stopStream"):
            return self._stream_call(method, p)
        if method.startswith("assistant.threads."):
            return self._assistant_call(method, p)
        if method == "views.open":
            view = p.get("view") or {}
            if not p.get("trigger_id"):
                return {"ok": False, "error": "invalid_trigger_id"}
            return {"ok": True, "view": {**view, "id": "V" + self._next_ts().replace(".", "")}}
        if method == "conversations.open":
            users = str(p.get("users") or "U0")
            return {"ok": True, "channel": {"id": "D" + users.split(",")[0].lstrip("U")}}
        if method == "users.info":
            user = p.get("user") or "U0"
            return {"ok": True, "user": {"id": user, "name": user.lower(), "real_name": f"User {user}",
                                         "is_bot": False, "profile": {"display_name": user.lower()}}}
        if method == "conversations.info":
            return {"ok": True, "channel": {"id": p.get("channel"), "name": "general", "is_member": True}}
        if method in ("conversations.replies", "conversations.history"):
            return {"ok": True, "messages": [], "has_more": False}
        return {"ok": True}


    def _stream_call(self, method: str, p: dict[str, Any]) -> dict:
        """https://docs.slack.dev/reference/methods/chat.startStream (and appendStream, stopStream)."""
        if not self.streaming:
            return {"ok": False, "error": "unknown_method"}
        channel = p.get("channel")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        chunks = p.get("chunks") or []
        if not isinstance(chunks, list) or any(not isinstance(c, dict) or c.get("type") != "markdown_text"
                                               or not isinstance(c.get("text"), str) for c in chunks):
            return {"ok": False, "error": "invalid_chunks"}
        text = (p.get("markdown_text") or "") + "".join(c["text"] for c in chunks)
        if len(p.get("markdown_text") or "") > MAX_MARKDOWN_TEXT or any(len(c["text"]) > MAX_MARKDOWN_TEXT for c in chunks):
            return {"ok": False, "error": "msg_too_long"}
        if method == "chat.startStream":
            if not str(channel).startswith("D") and not (p.get("recipient_user_id") and p.get("recipient_team_id")):
                return {"ok": False, "error": "invalid_arguments",
                        "detail": "recipient_user_id and recipient_team_id are required outside DMs"}
            ts = self._next_ts()
            self._messages[(channel, ts)] = {
                "channel": channel, "ts": ts, "thread_ts": p.get("thread_ts"), "text": text, "blocks": None,
                "user": self.bot_user_id, "bot_id": self.bot_id, "streaming": True,
                "recipient_user_id": p.get("recipient_user_id"), "updates": [time.monotonic()]}
            return {"ok": True, "channel": channel, "ts": ts}
        if method == "chat.appendStream" and not text:
            return {"ok": False, "error": "invalid_arguments", "detail": "markdown_text is required"}
        message = self._messages.get((channel, p.get("ts")))
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if not message.get("streaming"):
            return {"ok": False, "error": "message_not_in_streaming_state"}
        if method == "chat.stopStream":
            errors = block_errors(p.get("blocks"))
            if errors:
                return {"ok": False, "error": "invalid_blocks", "errors": errors}
            message.update({"blocks": p.get("blocks"), "streaming": False})
        message["text"] += text
        message["updates"].append(time.monotonic())
        return {"ok": True, "channel": channel, "ts": message["ts"]}

    @staticmethod
    def _assistant_call(method: str, p: dict[str, Any]) -> dict:
        """https://docs.slack.dev/reference/methods/assistant.threads.setStatus (setSuggestedPrompts, setTitle)."""
        if not p.get("channel_id"):
            return {"ok": False, "error": "channel_not_found"}
        if method == "assistant.threads.setStatus":
            if not p.get("thread_ts") or "status" not in p:
                return {"ok": False, "error": "invalid_arguments"}
            if len(p.get("loading_messages") or []) > MAX_LOADING_MESSAGES:
                return {"ok": False, "error": "invalid_arguments", "detail": "too many loading_messages"}
        elif method == "assistant.threads.setSuggestedPrompts":
            prompts = p.get("prompts")
            if (not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_SUGGESTED_PROMPTS
                    or any(not isinstance(x, dict) or not x.get("title") or not x.get("message") for x in prompts)):
                return {"ok": False, "error": "invalid_arguments", "detail": "1-4 prompts, each a title and a message"}
        elif method == "assistant.threads.setTitle":
            if not p.get("thread_ts") or not p.get("title"):
                return {"ok": False, "error": "invalid_arguments"}
        else:
            return {"ok": False, "error": "unknown_method"}
        return {"ok": True}


def _bearer(headers: dict[str, str], params: dict) -> bool:
    auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    return auth.startswith("Bearer xox") or str(params.get("token", "")).startswith("xox")


def _parse_params(path: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    params: dict[str, Any] = {}
    query = urllib.parse.urlsplit(path).query
    params.update({k: v[-1] for k, v in urllib.parse.parse_qs(query).items()})
    ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    if body:
        if "json" in ctype or body.lstrip()[:1] in (b"{", b"["):
            try:
                data = json.loads(body)
                if isinstance(data, dict):
                    params.update(data)
            except ValueError:
                params["_raw"] = body.decode("utf-8", "replace")
        else:
            params.update({k: v[-1] for k, v in urllib.parse.parse_qs(body.decode("utf-8")).items()})
    for key in ("blocks", "view", "attachments"):  # form-encoded calls send these as JSON strings
        if isinstance(params.get(key), str):
            try:
                params[key] = json.loads(params[key])
            except ValueError:
                pass
    return params


# Signing requests the way Slack does ----------------------------------------------------------------

def sign_request(body: bytes, secret: str, timestamp: int | str | None = None) -> dict[str, str]:
    """Headers Slack would send with `body`: timestamp, v0 signature, and the content type.

    Verifiable by `slack_sdk.signature.SignatureVerifier(secret)`. Pass an old `timestamp` to test
    replay protection (Slack's apps refuse anything older than 5 minutes).
    """
    if isinstance(body, str):
        body = body.encode()
    ts = str(int(time.time()) if timestamp is None else timestamp)
    base = b"v0:" + ts.encode() + b":" + body
    signature = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    ctype = "application/json" if body.lstrip()[:1] == b"{" else "application/x-www-form-urlencoded"
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": signature, "Content-Type": ctype}


def post_signed(url: str, body: bytes | str, secret: str, *, retry_num: int | None = None,
                retry_reason: str = "http_timeout", timestamp: int | str | None = None,
                headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, str]:
    """POST `body` to the bot as Slack would; returns (status, response text). Never raises on HTTP errors."""
    if isinstance(body, str):
        body = body.encode()
    all_headers = sign_request(body, secret, timestamp)
    if retry_num is not None:
        all_headers["X-Slack-Retry-Num"] = str(retry_num)
        all_headers["X-Slack-Retry-Reason"] = retry_reason
    all_headers.update(headers or {})
    req = urllib.request.Request(url, data=body, headers=all_headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


# Payloads shaped like Slack's documentation ----------------------------------------------------------

_event_seq = itertools.count(1)


def _ts() -> str:
    return f"{time.time():.6f}"


def app_mention_event(*, text: str, user: str = "U123", channel: str = "C123", ts: str | None = None,
                      thread_ts: str | None = None) -> dict:
    """https://api.slack.com/events/app_mention"""
    ev = {"type": "app_mention", "user": user, "text": text, "ts": ts or _ts(), "channel": channel,
          "event_ts": ts or _ts(), "team": TEAM_ID}
    if thread_ts:
        ev["thread_ts"] = thread_ts
    return ev


def message_event(*, text: str, user: str | None = "U123", channel: str = "D123", channel_type: str = "im",
                  ts: str | None = None, subtype: str | None = None, bot_id: str | None = None,
                  thread_ts: str | None = None, **extra) -> dict:
    """https://api.slack.com/events/message (message.im, message.channels …)."""
    ev: dict[str, Any] = {"type": "message", "channel": channel, "channel_type": channel_type, "text": text,
                          "ts": ts or _ts(), "event_ts": ts or _ts(), "team": TEAM_ID}
    if user is not None:
        ev["user"] = user
    if subtype:
        ev["subtype"] = subtype
    if bot_id:
        ev["bot_id"] = bot_id
    if thread_ts:
        ev["thread_ts"] = thread_ts
    ev.update(extra)
    return ev


def assistant_thread_event(*, type: str = "assistant_thread_started", user: str = "U123", channel: str = "D123",
                           thread_ts: str | None = None, context_channel: str | None = "C123") -> dict:
    """https://docs.slack.dev/reference/events/assistant_thread_started (and
    assistant_thread_context_changed: the same shape, sent when the user looks at another channel)."""
    context = {"channel_id": context_channel, "team_id": TEAM_ID, "enterprise_id": None} if context_channel else {}
    return {"type": type, "assistant_thread": {"user_id": user, "context": context, "channel_id": channel,
                                               "thread_ts": thread_ts or _ts()}, "event_ts": _ts()}


def assistant_message_event(*, text: str, thread_ts: str, user: str = "U123", channel: str = "D123",
                            ts: str | None = None) -> dict:
    """A user's message in an assistant thread: message.im with the thread's thread_ts
    (https://docs.slack.dev/ai/developing-agents#handling-user-messages)."""
    return message_event(text=text, user=user, channel=channel, channel_type="im", ts=ts, thread_ts=thread_ts)


def event_body(event: dict, *, event_id: str | None = None, team_id: str = TEAM_ID,
               authorizations_user: str = BOT_USER_ID) -> bytes:
    """The Events API envelope (`event_callback`) around `event`, as JSON bytes."""
    envelope = {
        "token": "verification-token-unused", "team_id": team_id, "api_app_id": API_APP_ID, "event": event,
        "type": "event_callback", "event_id": event_id or f"Ev{int(time.time())}{next(_event_seq):06d}",
        "event_time": int(time.time()),
        "authorizations": [{"enterprise_id": None, "team_id": team_id, "user_id": authorizations_user,
                            "is_bot": True, "is_enterprise_install": False}],
        "is_ext_shared_channel": False, "event_context": "4-fake",
    }
    return json.dumps(envelope).encode()


def slash_command_body(*, command: str, text: str = "", user: str = "U123", channel: str = "C123",
                       response_url: str = "http://127.0.0.1:9/response/unused",
                       trigger_id: str = "13345224609.738474920.8088930838d88f008e0",
                       channel_name: str = "general") -> bytes:
    """https://api.slack.com/interactivity/slash-commands: form-encoded."""
    return urllib.parse.urlencode({
        "token": "unused", "team_id": TEAM_ID, "team_domain": "fake", "channel_id": channel,
        "channel_name": channel_name, "user_id": user, "user_name": user.lower(), "command": command,
        "text": text, "api_app_id": API_APP_ID, "response_url": response_url, "trigger_id": trigger_id,
    }).encode()


def interactive_body(payload: dict) -> bytes:
    """Interactivity requests are form-encoded with one field: payload=<json>."""
    return urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()


def block_actions_payload(*, action_id: str, value: str, user: str = "U123", channel: str = "C123",
                          message_ts: str = "1700000000.000100", response_url: str = "http://127.0.0.1:9/response/unused",
                          trigger_id: str = "12466734323.1395872398.feedface", block_id: str = "feedback") -> dict:
    """https://api.slack.com/reference/interaction-payloads/block-actions"""
    return {
        "type": "block_actions", "team": {"id": TEAM_ID, "domain": "fake"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": TEAM_ID},
        "api_app_id": API_APP_ID, "token": "unused", "trigger_id": trigger_id,
        "container": {"type": "message", "message_ts": message_ts, "channel_id": channel, "is_ephemeral": False},
        "channel": {"id": channel, "name": "general"},
        "message": {"type": "message", "ts": message_ts, "user": BOT_USER_ID, "bot_id": BOT_ID, "text": "answer"},
        "response_url": response_url,
        "actions": [{"type": "button", "action_id": action_id, "block_id": block_id, "value": value,
                     "text": {"type": "plain_text", "text": action_id}, "action_ts": _ts()}],
    }


def view_submission_payload(*, callback_id: str, private_metadata: str, values: dict, user: str = "U123") -> dict:
    """https://api.slack.com/reference/interaction-payloads/views#view_submission
    `values` is state.values: {block_id: {action_id: {"type": "plain_text_input", "value": ...}}}."""
    return {
        "type": "view_submission", "team": {"id": TEAM_ID, "domain": "fake"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": TEAM_ID},
        "api_app_id": API_APP_ID, "token": "unused", "trigger_id": "12345.98765.abcd2358fdea",
        "view": {"id": "VFAKE", "team_id": TEAM_ID, "type": "modal", "callback_id": callback_id,
                 "private_metadata": private_metadata, "state": {"values": values}, "hash": "156772938.1827394",
                 "title": {"type": "plain_text", "text": "Feedback"}, "blocks": []},
        "response_urls": [],
    }
