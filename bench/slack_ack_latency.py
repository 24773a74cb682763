"""How fast the bot acknowledges Slack while it is generating answers, and whether retries duplicate answers.

    .venv/bin/python bench/slack_ack_latency.py                 # real Engine on the tiny base
    .venv/bin/python bench/slack_ack_latency.py --engine simulated --answer-s 2

Sets up a throwaway workspace (samples/kb imported, tiny base), starts the bot (`kbloop bot`'s HTTP server
and engine) in its own process, starts
the fake Slack Web API on loopback, then sends N signed app_mention events from C concurrent clients,
each event delivered twice (the second as Slack's retry, X-Slack-Retry-Num: 1, in shuffled order so a
retry often races its original). Every request's time to the HTTP response is the ack latency.
Then it waits for every answer and counts answers per event: a duplicate is a second chat.postMessage
or a second recorded interaction for one event.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bot import BotConfig, build_app, build_asgi  # noqa: E402
from finetune.serving.engine import Answer, Engine, Source  # noqa: E402
from store import local_db, open_db  # noqa: E402
from store.documents import import_documents  # noqa: E402
from store.interactions import record_interaction  # noqa: E402
from tests.fakes.slack_api import (  # noqa: E402
    BOT_USER_ID,
    FakeSlackAPI,
    app_mention_event,
    event_body,
    post_signed,
    sign_request,
)

SECRET = "bench-signing-secret"


class SimulatedEngine:
    """Answers after `answer_s` seconds of native matrix work on one generation thread at a time (like the
    Engine's single worker), recording the interaction like the Engine does."""

    def __init__(self, db_path: Path, answer_s: float):
        self.db_path, self.answer_s, self.ready, self.base_model = db_path, answer_s, True, "simulated"
        self._generating = threading.Lock()

    def answer(self, question, *, source="cli", user_id=None, channel_id=None, thread_ts=None, event_id=None,
               **_):
        import numpy as np

        with self._generating:
            a = np.random.rand(256, 256)
            end = time.monotonic() + self.answer_s
            while time.monotonic() < end:
                a = np.tanh(a @ a)
        iid = record_interaction(local_db(self.db_path), question=question, answer="simulated", source=source,
                                 user_id=user_id, channel_id=channel_id, thread_ts=thread_ts, event_id=event_id)
        return Answer("simulated", [Source("Doc", "doc.md")], None, int(self.answer_s * 1000), iid, None)


def serve_bot(args) -> int:
    """The bot in its own process (as deployed): engine + HTTP server, until terminated."""
    db_path = args.home / "kbloop.db"
    if args.engine == "real":
        engine = Engine(db_path=db_path, home=args.home, base_model="tiny").start()
    else:
        engine = SimulatedEngine(db_path, args.answer_s)
    config = BotConfig(bot_token="xoxb-bench", signing_secret=SECRET, api_url=args.slack_url)
    import signal

    import uvicorn

    asgi = build_asgi(build_app(config=config, engine=engine, db_path=db_path))
    server_ms: list[float] = []

    async def timed(scope, receive, send):
        # Server-side ack time: request received -> response started (excludes the client's own delays).
        t0 = time.perf_counter()

        async def timed_send(message):
            if message["type"] == "http.response.start" and scope.get("path") == "/slack/events":
                server_ms.append((time.perf_counter() - t0) * 1000)
            await send(message)

        await asgi(scope, receive, timed_send)

    if os.environ.get("BENCH_SWITCH"):
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH"]))
    server = uvicorn.Server(uvicorn.Config(timed, host="127.0.0.1", port=args.port, log_level="warning",
                                           access_log=False, lifespan="off"))

    def stop(*_):
        (args.home / "server_ms.json").write_text(json.dumps(server_ms))
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    server.run()
    return 0


def generate_load(plan: Path, port: int, concurrency: int) -> int:
    """Send every planned delivery, `concurrency` at a time; write each one's latency (ms) and status."""
    import asyncio

    items = [json.loads(line) for line in plan.read_text().splitlines()]
    latencies: list[float] = []
    statuses: list[int] = []

    async def client(todo: asyncio.Queue) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while not todo.empty():
            body, retry = todo.get_nowait()
            data = body.encode()
            t0 = time.perf_counter()
            # Slack signs each delivery when it sends it, and its retries go out up to minutes after the
            # original: a retry's timestamp, so its signature, differs (the same signature twice is a replay,
            # which the bot refuses). Shuffled, a retry may be sent first; a minute apart they never collide.
            headers = sign_request(data, SECRET, timestamp=int(time.time()) + 60 * (retry or 0))
            if retry is not None:
                headers.update({"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"})
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            writer.write(f"POST /slack/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(data)}\r\n"
                         f"{head}\r\n".encode() + data)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - t0) * 1000)
            statuses.append(int(status_line.split()[1]))
        writer.close()

    async def run() -> None:
        todo: asyncio.Queue = asyncio.Queue()
        for item in items:
            todo.put_nowait(item)
        await asyncio.gather(*(client(todo) for _ in range(concurrency)))

    asyncio.run(run())
    plan.with_suffix(".out.json").write_text(json.dumps({"latencies": latencies, "statuses": statuses}))
    return 0


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--engine", choices=["real", "simulated"], default="real")
    parser.add_argument("--answer-s", type=float, default=1.0, help="simulated engine: seconds per answer")
    parser.add_argument("--preload", type=int, default=20,
                        help="questions sent before the burst, so answers are being generated during it")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--serve-bot", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--slack-url", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve_bot:
        return serve_bot(args)
    if args.load:
        return generate_load(args.load, args.port, args.concurrency)
    load_start = os.getloadavg()
    home = Path(tempfile.mkdtemp(prefix="kbloop-bench-"))
    os.environ["KBLOOP_HOME"] = str(home)
    import subprocess
    import urllib.request

    db_path = home / "kbloop.db"
    db = open_db(db_path)
    import_documents(db, [REPO / "samples" / "kb"])
    questions = ["How do I submit an expense report?", "What is the VPN setup?", "When is the deployment freeze?",
                 "How do I report an incident?", "Where is the Berlin office?"]
    with FakeSlackAPI() as slack:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        child = subprocess.Popen([sys.executable, __file__, "--serve-bot", "--port", str(port), "--home", str(home),
                                  "--engine", args.engine, "--answer-s", str(args.answer_s), "--slack-url", slack.url],
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            base = f"http://127.0.0.1:{port}"
            print("waiting for the bot and its model …", flush=True)
            deadline = time.monotonic() + 600
            while True:
                try:
                    with urllib.request.urlopen(base + "/healthz", timeout=5):
                        break
                except OSError:
                    if child.poll() is not None or time.monotonic() > deadline:
                        print("the bot did not become ready", file=sys.stderr)
                        return 1
                    time.sleep(0.5)
            url = base + "/slack/events"
            # Warm up: bolt's first request does auth.test; not part of the measurement.
            post_signed(url, event_body(app_mention_event(text="warm up", user="UWARM"), event_id="EvWarm"), SECRET)
            slack.wait_for("chat.update", 1, timeout=600)
            # Keep the engine busy: questions whose answers are still being generated during the burst.
            for i in range(args.preload):
                ev = app_mention_event(text=f"<@{BOT_USER_ID}> {questions[i % len(questions)]} (background {i})",
                                       user=f"UPRE{i:03d}", channel="CPRE", ts=f"1711000000.{i:06d}")
                post_signed(url, event_body(ev, event_id=f"EvPre{i:03d}"), SECRET)
            slack.wait_for("chat.postMessage", 2 + min(args.preload, 1), timeout=600)  # generation under way
            deliveries = []
            for i in range(args.events):
                ev = app_mention_event(text=f"<@{BOT_USER_ID}> {questions[i % len(questions)]}", user=f"U{i:05d}",
                                       channel=f"C{i % 7}", ts=f"1712000000.{i:06d}")
                body = event_body(ev, event_id=f"EvBench{i:05d}")
                deliveries += [(body, None), (body, 1)]
            random.Random(7).shuffle(deliveries)
            plan = home / "deliveries.jsonl"
            plan.write_text("".join(json.dumps([b.decode(), r]) + "\n" for b, r in deliveries))
            started = time.perf_counter()
            # The load generator is its own process (one asyncio thread, one kept-alive connection per
            # concurrent client) so that neither it nor the fake Slack steal the bot's CPU more than Slack would.
            subprocess.run([sys.executable, __file__, "--load", str(plan), "--port", str(port),
                            "--concurrency", str(args.concurrency)], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            send_s = time.perf_counter() - started
            measured = json.loads(plan.with_suffix(".out.json").read_text())
            latencies, statuses = measured["latencies"], measured["statuses"]
            answered_when_sent = len(slack.requests("chat.update")) - 1
            slack.wait_for("chat.update", args.events + args.preload + 1, timeout=3600)
            all_done_s = time.perf_counter() - started
            time.sleep(1.0)  # let any (wrong) duplicate surface
        finally:
            child.terminate()
            child.wait(timeout=30)
        server_ms = json.loads((home / "server_ms.json").read_text())[1:] if (home / "server_ms.json").exists() else []
        posts = [r for r in slack.requests("chat.postMessage") if r.params.get("thread_ts", "").startswith("1712")]
        per_event: dict[str, int] = {}
        for r in posts:
            per_event[r.params["thread_ts"]] = per_event.get(r.params["thread_ts"], 0) + 1
    rows = db.execute("SELECT event_id, COUNT(*) FROM interactions WHERE event_id LIKE 'EvBench%' "
                      "GROUP BY event_id").fetchall()
    result = {
        "engine": args.engine, "events": args.events, "deliveries": len(deliveries), "concurrency": args.concurrency,
        "non_200": sum(1 for s in statuses if s != 200),
        "ack_ms": {"p50": round(percentile(latencies, 50), 1), "p90": round(percentile(latencies, 90), 1),
                   "p99": round(percentile(latencies, 99), 1), "max": round(max(latencies), 1),
                   "mean": round(statistics.mean(latencies), 1)},
        "server_ack_ms": {"p50": round(percentile(server_ms, 50), 1), "p99": round(percentile(server_ms, 99), 1),
                          "max": round(max(server_ms), 1)} if server_ms else None,
        "preloaded_questions": args.preload,
        "answers_posted_before_last_ack": answered_when_sent,
        "send_s": round(send_s, 2), "all_answered_s": round(all_done_s, 2),
        "answered_events": len(per_event), "duplicate_answers": sum(n - 1 for n in per_event.values()),
        "interactions": sum(n for _, n in rows), "duplicate_interactions": sum(n - 1 for _, n in rows),
        "cpu_count": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = result["ack_ms"]["p99"] < 100 and result["duplicate_answers"] == 0 and result["non_200"] == 0 \
        and result["answered_events"] == args.events and result["duplicate_interactions"] == 0
    print("PASS" if ok else "FAIL", "(p99 ack < 100 ms, every event answered exactly once)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
