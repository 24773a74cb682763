"""Streamed answers in Slack: time from the question to the first streamed characters, against today's time to
the whole answer (placeholder + chat.update), with the engine busy; updates per message; lost characters.

    .venv/bin/python bench/slack_streaming.py [--questions 16] [--rounds 2] [--out bench/out/slack_streaming.json]

Builds a workspace in a temporary folder (sample KB, tiny base), then runs the bot as `kbloop serve` does
(one process: the Engine with its defaults, the HTTP endpoint) against the fake Slack Web API on loopback,
and sends N signed app_mention events at once (each in its own thread), twice per round:
- `streamed`: the fake plays a workspace with chat.startStream / appendStream / stopStream;
- `today`: a workspace without them, so the bot falls back to what it did before streaming: a placeholder
  replaced by the whole answer with chat.update.
Times are taken from the moment a question is sent to the moment the fake Slack receives the call:
first characters = chat.startStream (it carries the first text), whole answer = chat.stopStream /
chat.update. Updates per message: every call that changed a streamed message (start, appends, stop), and the
shortest gap between two of them (the bot promises ≥ 0.5 s). Lost characters: each streamed message's final
text against the answer the engine recorded (escaped as the bot escapes it), and the streamed answers
against the `today` answers to the same questions (greedy decoding: they must be equal).
"""

from __future__ import annotations

import argparse
import json
import os
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

from bench.engine_batching import eval_questions, prepare_workspace  # noqa: E402
from bot import BackgroundHttpServer, BotConfig, build_app, shutdown  # noqa: E402
from bot.blocks import escape_markdown  # noqa: E402
from finetune.serving.engine import Engine  # noqa: E402
from store import local_db  # noqa: E402
from store.interactions import list_interactions  # noqa: E402
from tests.fakes.slack_api import BOT_USER_ID, FakeSlackAPI, app_mention_event, event_body, post_signed  # noqa: E402

SECRET = "bench-signing-secret"
CHANNEL = "CBENCH"


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def ask_all(bot_url: str, questions: list[str], tag: str) -> dict[str, tuple[str, float]]:
    """Send every question at once; {thread ts: (question, time.time() when sent)}."""
    sent: dict[str, tuple[str, float]] = {}
    barrier = threading.Barrier(len(questions))
    lock = threading.Lock()

    def send(i: int, q: str) -> None:
        ts = f"17{tag}{i:02d}.000100"
        body = event_body(app_mention_event(text=f"<@{BOT_USER_ID}> {q}", channel=CHANNEL, ts=ts),
                          event_id=f"Ev{tag}{i:02d}")
        barrier.wait()
        started = time.time()
        status, _ = post_signed(f"{bot_url}/slack/events", body, SECRET)
        assert status == 200, status
        with lock:
            sent[ts] = (q, started)

    threads = [threading.Thread(target=send, args=(i, q)) for i, q in enumerate(questions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sent


def run_round(bot_url: str, slack, db, questions: list[str], *, streaming: bool, tag: str) -> dict:
    slack.reset()
    slack.streaming = streaming
    # Streamed: a generated answer ends with chat.stopStream; one that arrives whole (nothing found in the KB)
    # is posted as one message. Today: every answer replaces its placeholder (chat.update).
    done_methods = ("chat.stopStream", "chat.postMessage") if streaming else ("chat.update",)
    load = os.getloadavg()  # the machine is shared: say how busy it was
    sent = ask_all(bot_url, questions, tag)

    def by_thread(*methods):
        return {r.params.get("thread_ts") or _thread_of(slack, r): r for m in methods for r in slack.requests(m)}

    deadline = time.monotonic() + 1800
    while len(by_thread(*done_methods)) < len(questions) and time.monotonic() < deadline:
        time.sleep(0.2)
    done = by_thread(*done_methods)
    first = by_thread("chat.startStream", "chat.postMessage") if streaming else done
    rows, lost, gaps, rates = [], 0, [], []
    answers = {i.thread_ts: i for i in list_interactions(db, channel_id=CHANNEL, limit=10_000)}
    for ts, (question, started) in sent.items():
        interaction = answers[ts]
        row = {"question": question, "first_chars_s": round(first[ts].received_at - started, 3),
               "full_answer_s": round(done[ts].received_at - started, 3), "answer": interaction.answer}
        if streaming:
            message = next(m for m in slack.messages(CHANNEL) if m["thread_ts"] == ts)
            updates = slack.stream_updates(CHANNEL, message["ts"])
            row["updates"] = len(updates)  # 0: posted whole (chat.postMessage)
            gaps += [b - a for a, b in zip(updates, updates[1:])]
            if len(updates) > 1:
                rates.append((len(updates) - 1) / (updates[-1] - updates[0]))  # updates per second, start to stop
            if "streaming" in message:  # a streamed message (one posted whole carries the answer in its blocks)
                lost += message["text"] != escape_markdown(interaction.answer)
                row["streamed"] = True
        rows.append(row)
    out = {
        "mode": "streamed" if streaming else "today",
        "questions": len(rows),
        "load_average_before": load,
        "first_chars_p50_s": p50([r["first_chars_s"] for r in rows]),
        "full_answer_p50_s": p50([r["full_answer_s"] for r in rows]),
        "rows": rows,
    }
    if streaming:
        out.update({
            "updates_per_message": [r["updates"] for r in rows],
            "min_gap_between_updates_s": round(min(gaps), 3) if gaps else None,
            "max_updates_per_s_any_message": round(1 / min(gaps), 2) if gaps else None,
            "mean_updates_per_message_per_s": round(statistics.mean(rates), 2) if rates else None,
            "messages_differing_from_engine_answer": lost,
        })
    return out


def _thread_of(slack, request) -> str | None:
    """chat.update carries no thread_ts: the placeholder it replaces does."""
    for m in slack.messages(CHANNEL):
        if m["ts"] == request.params.get("ts"):
            return m["thread_ts"]
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "slack_streaming.json")
    args = ap.parse_args()

    questions = eval_questions(args.questions)
    with tempfile.TemporaryDirectory() as tmp, FakeSlackAPI() as slack:
        home = Path(tmp)
        prepare_workspace(home)
        db_path = home / "kbloop.db"
        engine = Engine(db_path=db_path, home=home, base_model="tiny").start()  # the engine's defaults
        assert engine.wait_ready(900), engine.error
        config = BotConfig(bot_token="xoxb-bench", signing_secret=SECRET, api_url=slack.url,
                           rate_limit_questions=10_000, answer_workers=max(8, args.questions))
        results = []
        try:
            for rnd in range(args.rounds):
                for streaming in (True, False):
                    # A fresh bot per run: a refused stream is remembered for 10 minutes by the bot.
                    app = build_app(config=config, engine=engine, db_path=db_path)
                    if streaming:  # the workspace is known to stream: whole answers go as one message
                        app.kbloop.streaming.works = True
                    else:  # today's flow from the first question: placeholder at once, then update
                        app.kbloop.streaming.refused("bench: streaming off")
                    server = BackgroundHttpServer(app).start()
                    try:
                        tag = f"{rnd}{int(streaming)}"
                        result = run_round(server.url, slack, local_db(db_path), questions, streaming=streaming,
                                           tag=tag)
                    finally:
                        server.stop()
                        shutdown(app)
                    result["round"] = rnd
                    results.append(result)
                    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
        finally:
            engine.close()
    streamed = [r for r in results if r["mode"] == "streamed"]
    today = [r for r in results if r["mode"] == "today"]
    same = sum(a["answer"] == b["answer"] for s, t in zip(streamed, today)
               for a, b in zip(sorted(s["rows"], key=lambda r: r["question"]),
                               sorted(t["rows"], key=lambda r: r["question"])))
    summary = {
        "questions_at_once": args.questions, "rounds": args.rounds,
        "load_average": os.getloadavg(),
        "load_average_before_rounds": [r["load_average_before"] for r in results],
        "streamed_first_chars_p50_s": [r["first_chars_p50_s"] for r in streamed],
        "streamed_full_answer_p50_s": [r["full_answer_p50_s"] for r in streamed],
        "today_full_answer_p50_s": [r["full_answer_p50_s"] for r in today],
        "min_gap_between_updates_s": min(r["min_gap_between_updates_s"] or 9e9 for r in streamed),
        "mean_updates_per_message_per_s": [r["mean_updates_per_message_per_s"] for r in streamed],
        "messages_differing_from_engine_answer": sum(r["messages_differing_from_engine_answer"] for r in streamed),
        "streamed_answers_equal_to_today": f"{same} of {sum(len(s['rows']) for s in streamed)}",
    }
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "runs": results}, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
