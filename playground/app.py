"""The Gradio layout: four tabs wired to the handler modules (review, dataset, chat, training).

    demo = build_playground(config=PlaygroundConfig(), engine=engine, db_path=db_path, home=home)
    launch(demo, config=config)                      # `kbloop playground`
    mount_playground(fastapi_app, demo, config=config)  # `kbloop serve`, at /playground

Every event handler resolves the caller (gr.Request.username, or "local" without a login) and opens the
calling thread's own database connection; the decisions themselves live in the handler modules, which
are tested without Gradio. Endpoints carry api_name so gradio_client (and scripts) can drive the app.

Launched or mounted, the app sits behind playground.auth's PlaygroundGuard (loopback names only without a
login) and LoginGate (passwords, with a wait after repeated failures).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

import gradio as gr
import pandas as pd

from playground import chat, dataset, review, search, training
from playground.auth import LoginGate, PlaygroundGuard, Viewer, viewer_from_request
from playground.config import PlaygroundConfig, check_bind
from playground.review import QueueFilter
from store import local_db
from store.interactions import review_channels

# No phoning home: the playground runs on machines that may not reach the internet at all.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CSS = """
#review-flags { color: #b45309; }
.kb-small textarea { font-size: 0.9em; }
footer { display: none !important; }
"""

STATUS_CHOICES = [("to review", "to_review"), ("unreviewed", "unreviewed"), ("pending correction", "pending"),
                  ("approved", "approved"), ("rejected", "rejected"), ("merged", "merged"), ("all", "all")]
VOTE_CHOICES = [("all", "all"), ("👎", "down"), ("👍 only", "up")]
QUEUE_COLUMNS = ["key", "votes", "status", "question", "corrected", "channel", "created_at"]


def _queue_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"key": r["key"], "votes": f"👍{r['up']} 👎{r['down']}", "status": r["status"],
                          "question": r["question"][:140], "corrected": "✎" if r["corrected"] else "",
                          "channel": r["channel"], "created_at": r["created_at"][:16].replace("T", " ")}
                         for r in rows], columns=QUEUE_COLUMNS)


def _item_view(item: review.ReviewItem | None) -> list:
    """Values for the item panel, in the order of `item_outputs` below."""
    if item is None:
        return ["", "", "_Nothing left to review with these filters._", "", "", "", "", "", "", False, "",
                gr.update(choices=[], value=None)]
    # review.item_markdown escapes every outside text (no remote images) and lays a disputed approved answer beside
    # the correction.
    md = review.item_markdown(item)
    merge_choices = [(f"#{m.candidate.id}: {m.candidate.question[:80]}", str(m.candidate.id))
                     for m in item.duplicates if m.candidate.kind == "example"]
    return [item.key, item.status, md.header, item.question, md.bot_answer, md.sources, md.corrections, md.flags,
            item.proposed_answer, False, md.duplicates,
            gr.update(choices=merge_choices, value=merge_choices[0][1] if merge_choices else None)]


# Gradio's own copies of uploads and downloads (its cache): every 15 minutes, those older than an hour go.
GRADIO_CACHE_SWEEP = (900, 3600)


class ExportFolders:
    """Where exports are written for download: a fresh `export-*` folder per export under one root (the
    configured export_dir, or a temporary folder of its own), of which only the newest `keep` remain.

    Gradio copies a returned file into its cache as the handler returns, so an export folder is needed
    for moments only; keeping a few covers exports that run at once. `close()` (when the server stops)
    removes them all, and the root too when it made it.
    """

    PREFIX = "export-"

    def __init__(self, export_dir: str | None, *, keep: int):
        self._given = Path(export_dir) if export_dir else None
        self.keep = keep
        self._root: Path | None = None
        self._lock = threading.Lock()

    def new(self) -> Path:
        with self._lock:
            if self._root is None or not self._root.is_dir():
                if self._given is not None:
                    self._given.mkdir(parents=True, exist_ok=True)
                    self._root = self._given
                else:
                    self._root = Path(tempfile.mkdtemp(prefix="kbloop-exports-"))
            old = sorted(self._root.glob(self.PREFIX + "*"), key=lambda p: p.stat().st_mtime)
            for folder in old[: max(0, len(old) - (self.keep - 1))]:
                shutil.rmtree(folder, ignore_errors=True)
            return Path(tempfile.mkdtemp(prefix=self.PREFIX, dir=self._root))

    def close(self) -> None:
        with self._lock:
            if self._root is None:
                return
            if self._given is None:
                shutil.rmtree(self._root, ignore_errors=True)
            else:
                for folder in self._root.glob(self.PREFIX + "*"):
                    shutil.rmtree(folder, ignore_errors=True)
            self._root = None


def build_playground(*, config: PlaygroundConfig, engine, db_path: Path | str, home: Path | str | None = None) -> gr.Blocks:
    """The playground as a gr.Blocks (not launched). `engine` may be None: the chat tab then says so."""
    db_path = Path(db_path)

    exports = ExportFolders(config.export_dir, keep=config.export_keep)

    def db():
        return local_db(db_path)

    def who(request: gr.Request) -> Viewer:
        return viewer_from_request(request, config)

    def current_filter(vote, status, channel, since, until, text) -> QueueFilter:
        return QueueFilter(vote=vote or "all", status=status or "to_review", channel=channel or "",
                           since=since or "", until=until or "", text=text or "")

    def load_queue(vote, status, channel, since, until, text):
        try:
            rows = review.queue(db(), current_filter(vote, status, channel, since, until, text),
                                limit=config.queue_page_size)
            note = ""
        except review.StoreError as exc:
            rows, note = [], f"\n\n⚠️ {exc}"
        return rows, review.counts_line(db()) + note

    def open_key(key: str) -> list:
        if not key:
            return _item_view(None)
        return _item_view(review.open_item(db(), key.strip()))

    with gr.Blocks(title=config.title, analytics_enabled=False, delete_cache=GRADIO_CACHE_SWEEP) as demo:
        with gr.Row():
            gr.Markdown(f"## {config.title}")
            whoami = gr.Markdown("", elem_id="whoami")

        # ------------------------------------------------------------------ Review
        with gr.Tab("Review", id="review"):
            with gr.Row():
                f_vote = gr.Radio(VOTE_CHOICES, value="all", label="Vote", scale=1)
                f_status = gr.Dropdown(STATUS_CHOICES, value="to_review", label="Status", scale=1)
                f_channel = gr.Dropdown([("any", "")], value="", label="Channel", scale=1, allow_custom_value=True)
                f_since = gr.Textbox(label="From (YYYY-MM-DD)", scale=1)
                f_until = gr.Textbox(label="To (YYYY-MM-DD)", scale=1)
                f_text = gr.Textbox(label="Text", placeholder="search questions, answers, corrections", scale=2)
                refresh_btn = gr.Button("Refresh", scale=0)
            counts_md = gr.Markdown(elem_id="review-counts")
            queue_df = gr.Dataframe(headers=QUEUE_COLUMNS, interactive=False, wrap=True, max_height=280,
                                    label="Queue (click a row to open it)", elem_id="review-queue")
            with gr.Row():
                with gr.Column(scale=3):
                    item_header = gr.Markdown(elem_id="review-header")
                    with gr.Row():
                        item_key = gr.Textbox(label="Item", scale=1, elem_id="review-key")
                        open_btn = gr.Button("Open", scale=0)
                        next_btn = gr.Button("Next to review", scale=0)
                    item_question = gr.Textbox(label="Question (editable)", lines=2, elem_id="review-question")
                    bot_answer = gr.Markdown(label="The bot's answer", elem_id="review-bot-answer")
                    item_sources = gr.Markdown()
                    item_corrections = gr.Markdown(elem_id="review-corrections")
                    item_flags = gr.Markdown(elem_id="review-flags")
                    answer_tb = gr.Textbox(label="Answer to approve (edit it to approve your version)", lines=6,
                                           elem_id="review-answer")
                    confirm_cb = gr.Checkbox(label="Approve anyway: I checked the warnings above", value=False,
                                             elem_id="review-confirm")
                    with gr.Row():
                        approve_btn = gr.Button("Approve", variant="primary", elem_id="approve-btn")
                        redact_btn = gr.Button("Redact", elem_id="redact-btn")
                        reject_btn = gr.Button("Reject", variant="stop", elem_id="reject-btn")
                    review_msg = gr.Markdown(elem_id="review-message")
                with gr.Column(scale=2):
                    dups_md = gr.Markdown(elem_id="review-duplicates")
                    merge_dd = gr.Dropdown([], label="Merge into example", allow_custom_value=True)
                    merge_answer_cb = gr.Checkbox(label="…and give it the answer on the left", value=False)
                    merge_btn = gr.Button("Merge", elem_id="merge-btn")
            item_status = gr.State("")

        # ------------------------------------------------------------------ Dataset
        with gr.Tab("Dataset", id="dataset") as dataset_tab:
            with gr.Row():
                ds_search = gr.Textbox(label="Search", placeholder="text in question or answer", scale=3,
                                       elem_id="dataset-search")
                ds_status = gr.Dropdown(["approved", "pending", "rejected", "all"], value="approved", label="Status",
                                        scale=1)
                ds_refresh = gr.Button("Search", scale=0, elem_id="dataset-search-btn")
            ds_table = gr.Dataframe(headers=dataset.TABLE_COLUMNS, interactive=False, wrap=True, max_height=360,
                                    label="Examples (click a row to edit it)", elem_id="dataset-table")
            with gr.Accordion("Edit the selected example", open=True):
                with gr.Row():
                    ds_id = gr.Textbox(label="Example id", scale=0, min_width=120)
                    ds_question = gr.Textbox(label="Question", lines=2, scale=3)
                    ds_input = gr.Textbox(label="Input (optional)", lines=2, scale=2)
                ds_answer = gr.Textbox(label="Answer", lines=4)
                with gr.Row():
                    ds_confirm = gr.Checkbox(label="Save anyway (contains flagged data)", value=False)
                    ds_save = gr.Button("Save", variant="primary")
                    ds_remove = gr.Button("Remove from training data", variant="stop")
                ds_msg = gr.Markdown()
            with gr.Row():
                with gr.Column():
                    gr.Markdown("#### Import\nJSONL or CSV: instruction/input/output, question/answer, or messages. "
                                "A file with any bad line is refused whole.")
                    imp_file = gr.File(label="File", file_types=[".jsonl", ".json", ".ndjson", ".csv", ".tsv"])
                    imp_status = gr.Radio(["approved", "pending"], value="approved", label="Import as")
                    imp_btn = gr.Button("Import")
                    imp_msg = gr.Textbox(label="Result", lines=4, interactive=False, elem_id="import-result")
                with gr.Column():
                    gr.Markdown("#### Export\nsft = instruction/input/output · messages = TRL conversational · "
                                "dpo = prompt/chosen/rejected · kto = prompt/completion/label")
                    exp_fmt = gr.Dropdown(["sft", "messages", "dpo", "kto"], value="sft", label="Format")
                    exp_btn = gr.Button("Export")
                    exp_file = gr.File(label="Download", interactive=False)
                    exp_msg = gr.Markdown()
            stats_md = gr.Markdown()
            with gr.Row():
                growth_plot = gr.LinePlot(x="day", y="examples", color="source", title="Approved examples over time",
                                          height=260)
                comp_plot = gr.BarPlot(x="group", y="count", title="Examples by status and source", height=260,
                                       x_label_angle=-30)

        # ------------------------------------------------------------------ Chat
        with gr.Tab("Chat", id="chat"):
            gr.Markdown("Ask the model. Compare the base model, the active adapter and a candidate on the same "
                        "question; 👍 / 👎 are stored as feedback (source: playground) and land in the review queue.")
            with gr.Row():
                chat_q = gr.Textbox(label="Question", scale=4, elem_id="chat-question")
                chat_btn = gr.Button("Ask", variant="primary", scale=0, elem_id="chat-ask")
            columns = []
            with gr.Row():
                for label, default in (("A", "active"), ("B", "base"), ("C", "")):
                    with gr.Column():
                        dd = gr.Dropdown([("active", "active"), ("base model", "base")], value=default or None,
                                         label=f"Column {label}: model", allow_custom_value=True)
                        bot = gr.Chatbot(label=f"Column {label}", height=360, buttons=["copy"])
                        with gr.Row():
                            up = gr.Button("👍", size="sm")
                            down = gr.Button("👎", size="sm")
                        corr = gr.Textbox(label="Correction for 👎 (optional)", lines=2)
                        iid = gr.State(None)
                        columns.append((dd, bot, up, down, corr, iid))
            chat_msg = gr.Markdown()

        # ------------------------------------------------------------------ Search
        with gr.Tab("Search", id="search"):
            gr.Markdown("The passages the bot retrieves for a question, best first, with the evidence behind each "
                        "rank (the same search as `kbloop kb search`).")
            with gr.Row():
                search_q = gr.Textbox(label="Question", scale=4, elem_id="search-question")
                search_btn = gr.Button("Search", variant="primary", scale=0, elem_id="search-run")
            search_table = gr.Dataframe(headers=search.HEADERS, interactive=False, wrap=True, elem_id="search-results")
            search_msg = gr.Markdown(elem_id="search-summary")

        # ------------------------------------------------------------------ Training
        with gr.Tab("Training", id="training", visible=False) as training_tab:
            gr.Markdown("Admins only. Jobs go to the same queue as Slack's `/kb-retrain`; a worker runs them.")
            with gr.Row():
                tr_method = gr.Dropdown([("default", ""), "qlora", "lora", "full"], value="", label="Method")
                tr_rank = gr.Textbox(label="Rank (N or auto; empty: default)")
                tr_epochs = gr.Number(label="Epochs (0: default)", value=0)
                tr_force = gr.Checkbox(label="Train even if the data did not change")
                tr_objective = gr.Dropdown(
                    [("sft: the approved examples", ""), ("kto: the 👍 / 👎 votes", "kto"),
                     ("dpo: correction pairs", "dpo")], value="", label="Objective",
                    info="kto and dpo continue the active adapter (docs/training.md)")
            with gr.Row():
                tr_start = gr.Button("Start retraining", variant="primary")
                tr_cancel = gr.Button("Cancel the current job", variant="stop")
            tr_msg = gr.Markdown()
            tr_progress = gr.Markdown()
            tr_loss = gr.LinePlot(x="step", y="loss", title="Training loss", height=260)
            tr_jobs = gr.Dataframe(headers=training.JOB_COLUMNS, interactive=False, label="Jobs", max_height=220)
            gr.Markdown("#### Adapters")
            ad_table = gr.Dataframe(headers=training.ADAPTER_COLUMNS, interactive=False, label="Adapters",
                                    max_height=260)
            with gr.Row():
                ad_version = gr.Dropdown([], label="Version", allow_custom_value=True)
                ad_force = gr.Checkbox(label="Force past the gate")
                ad_promote = gr.Button("Promote", variant="primary")
                ad_rollback = gr.Button("Roll back", variant="stop")
            ad_verdict = gr.Markdown()
            ad_msg = gr.Markdown()
            timer = gr.Timer(config.poll_interval_s, active=False)

        # ================================================================== wiring: review
        filters = [f_vote, f_status, f_channel, f_since, f_until, f_text]
        item_outputs = [item_key, item_status, item_header, item_question, bot_answer, item_sources, item_corrections,
                        item_flags, answer_tb, confirm_cb, dups_md, merge_dd]

        def refresh(vote, status, channel, since, until, text):
            rows, counts = load_queue(vote, status, channel, since, until, text)
            first = next((r["key"] for r in rows if r["status"] in review.TO_REVIEW), rows[0]["key"] if rows else "")
            channels = [("any", "")] + [(c, c) for c in review_channels(db())]
            return [counts, _queue_frame(rows), gr.update(choices=channels)] + open_key(first)

        refresh_outputs = [counts_md, queue_df, f_channel] + item_outputs
        refresh_btn.click(refresh, filters, refresh_outputs, api_name="queue")
        for comp in (f_vote, f_status, f_channel):
            comp.change(refresh, filters, refresh_outputs, api_name=False)
        for comp in (f_since, f_until, f_text):
            comp.submit(refresh, filters, refresh_outputs, api_name=False)

        def on_select(frame: pd.DataFrame, evt: gr.SelectData):
            row = evt.row_value if evt.row_value else frame.iloc[evt.index[0]].tolist()
            return open_key(str(row[0]))

        queue_df.select(on_select, queue_df, item_outputs, api_name=False)
        def open_item(key):
            return open_key(key)

        open_btn.click(open_item, item_key, item_outputs, api_name="open_item")
        item_key.submit(open_item, item_key, item_outputs, api_name=False)

        def next_item(vote, status, channel, since, until, text):
            rows, _ = load_queue(vote, status, channel, since, until, text)
            return open_key(next((r["key"] for r in rows if r["status"] in review.TO_REVIEW), ""))

        next_btn.click(next_item, filters, item_outputs, api_name="next_item")

        def after(outcome: review.Outcome, flt, key: str):
            """Message, counts, queue; then the next item to review (or the same one, if refused)."""
            rows, counts = load_queue(*flt)
            if outcome.ok:
                nxt = next((r["key"] for r in rows if r["status"] in review.TO_REVIEW and r["key"] != key), "")
                view = open_key(nxt)
            else:
                view = [gr.update()] * len(item_outputs)
            icon = "✅" if outcome.ok else "⛔"
            return [f"{icon} {outcome.message}", counts, _queue_frame(rows)] + view

        decision_outputs = [review_msg, counts_md, queue_df] + item_outputs

        def do_approve(key, seen_status, question, answer, confirm, vote, status, channel, since, until, text,
                       request: gr.Request):
            outcome = review.approve(db(), who(request), key, answer=answer, question=question, confirm=confirm,
                                     expected_status=seen_status or None)
            return after(outcome, (vote, status, channel, since, until, text), key)

        def do_reject(key, seen_status, vote, status, channel, since, until, text, request: gr.Request):
            outcome = review.reject(db(), who(request), key, expected_status=seen_status or None)
            return after(outcome, (vote, status, channel, since, until, text), key)

        def do_merge(key, seen_status, into, use_answer, answer, confirm, vote, status, channel, since, until, text,
                     request: gr.Request):
            outcome = review.merge(db(), who(request), key, into, answer=answer if use_answer else None,
                                   confirm=confirm, expected_status=seen_status or None)
            return after(outcome, (vote, status, channel, since, until, text), key)

        approve_btn.click(do_approve, [item_key, item_status, item_question, answer_tb, confirm_cb] + filters,
                          decision_outputs, api_name="approve")
        reject_btn.click(do_reject, [item_key, item_status] + filters, decision_outputs, api_name="reject")
        merge_btn.click(do_merge, [item_key, item_status, merge_dd, merge_answer_cb, answer_tb, confirm_cb] + filters,
                        decision_outputs, api_name="merge")

        def do_redact(text):
            new, msg = review.redact_answer(text)
            return new, f"✂️ {msg}"

        redact_btn.click(do_redact, answer_tb, [answer_tb, review_msg], api_name="redact")

        # ================================================================== wiring: dataset
        def ds_load(search, status):
            return dataset.examples_table(db(), search=search or "", status=status or "approved")

        ds_refresh.click(ds_load, [ds_search, ds_status], ds_table, api_name="dataset")
        ds_search.submit(ds_load, [ds_search, ds_status], ds_table, api_name=False)
        ds_status.change(ds_load, [ds_search, ds_status], ds_table, api_name=False)

        def ds_select(frame: pd.DataFrame, evt: gr.SelectData):
            row = evt.row_value if evt.row_value else frame.iloc[evt.index[0]].tolist()
            ex_id, q, inp, a = dataset.load_example(db(), row[0])
            return str(ex_id), q, inp, a, False

        ds_table.select(ds_select, ds_table, [ds_id, ds_question, ds_input, ds_answer, ds_confirm], api_name=False)

        def ds_do_save(example_id, question, input, answer, confirm, search, status, request: gr.Request):
            outcome = dataset.save_example(db(), who(request), example_id, question=question, answer=answer,
                                           input=input, confirm=confirm)
            return ("✅ " if outcome.ok else "⛔ ") + outcome.message, ds_load(search, status)

        ds_save.click(ds_do_save, [ds_id, ds_question, ds_input, ds_answer, ds_confirm, ds_search, ds_status],
                      [ds_msg, ds_table], api_name="save_example")

        def ds_do_remove(example_id, search, status, request: gr.Request):
            outcome = dataset.remove_example(db(), who(request), example_id)
            return ("✅ " if outcome.ok else "⛔ ") + outcome.message, ds_load(search, status)

        ds_remove.click(ds_do_remove, [ds_id, ds_search, ds_status], [ds_msg, ds_table], api_name="remove_example")

        def stats_outputs():
            return dataset.stats_markdown(db()), dataset.growth_frame(db()), dataset.composition_frame(db())

        def do_import(file, status, search, shown_status, request: gr.Request):
            path = file if isinstance(file, (str, Path)) else getattr(file, "name", None)
            name = getattr(file, "orig_name", None) or (Path(path).name if path else None)
            outcome = dataset.import_file(db(), who(request), path, display_name=name, status=status)
            return (outcome.message, ds_load(search, shown_status)) + stats_outputs()

        imp_btn.click(do_import, [imp_file, imp_status, ds_search, ds_status],
                      [imp_msg, ds_table, stats_md, growth_plot, comp_plot], api_name="import_examples")

        def do_export(format):
            path, outcome = dataset.export_file(db(), format, out_dir=exports.new())
            return (path or None), outcome.message

        exp_btn.click(do_export, exp_fmt, [exp_file, exp_msg], api_name="export")

        def on_dataset_tab(search, status):
            return (ds_load(search, status),) + stats_outputs()

        # Decisions in the review tab change the dataset: show it fresh whenever the tab is opened.
        dataset_tab.select(on_dataset_tab, [ds_search, ds_status], [ds_table, stats_md, growth_plot, comp_plot],
                           api_name=False)

        # ================================================================== wiring: chat
        def refresh_adapter_choices():
            choices = chat.adapter_choices(db()) + [("(none)", "")]
            cand = chat.default_candidate(db())
            return [gr.update(choices=choices), gr.update(choices=choices),
                    gr.update(choices=choices, value=cand or "")]

        def do_ask(question, model_a, model_b, model_c, history_a, history_b, history_c, request: gr.Request):
            chosen = [model_a, model_b, model_c]
            answers = chat.ask(engine, who(request), question, [x for x in chosen if x])
            by_adapter = {ans.adapter: ans for ans in answers}
            out_hist, out_ids = [], []
            for sel, hist in zip(chosen, (history_a, history_b, history_c)):
                ans = by_adapter.get(sel) if sel else None
                hist = list(hist or [])
                if ans is not None:
                    hist += [{"role": "user", "content": question},
                             {"role": "assistant", "content": chat.answer_markdown(ans)}]
                out_hist.append(hist)
                out_ids.append(ans.interaction_id if ans else None)
            return out_hist + out_ids + [""]

        chat_inputs = [chat_q] + [c[0] for c in columns] + [c[1] for c in columns]
        chat_outputs = [c[1] for c in columns] + [c[5] for c in columns] + [chat_msg]
        chat_btn.click(do_ask, chat_inputs, chat_outputs, api_name="ask")

        def do_search(question):
            return search.search(db(), question)

        search_btn.click(do_search, [search_q], [search_table, search_msg], api_name="search")
        search_q.submit(do_search, [search_q], [search_table, search_msg], api_name=False)
        chat_q.submit(do_ask, chat_inputs, chat_outputs, api_name=False)

        def make_vote(value: int):
            def do_vote(interaction_id, correction, request: gr.Request):
                outcome = chat.vote(db(), who(request), interaction_id, value, correction if value < 0 else None)
                return ("✅ " if outcome.ok else "⛔ ") + outcome.message
            return do_vote

        for _dropdown, _bot, up, down, corr, iid in columns:
            up.click(make_vote(1), [iid, corr], chat_msg, api_name=False)
            down.click(make_vote(-1), [iid, corr], chat_msg, api_name=False)

        def api_vote(interaction_id: int, value: int, correction: str, request: gr.Request) -> str:
            outcome = chat.vote(db(), who(request), interaction_id, int(value), correction or None)
            return ("✅ " if outcome.ok else "⛔ ") + outcome.message

        vote_id = gr.Number(visible=False, precision=0)
        vote_value = gr.Number(visible=False, precision=0)
        vote_corr = gr.Textbox(visible=False)
        vote_btn = gr.Button(visible=False)
        vote_btn.click(api_vote, [vote_id, vote_value, vote_corr], chat_msg, api_name="vote")

        # ================================================================== wiring: training
        def train_poll(request: gr.Request):
            if not who(request).is_admin:
                return [gr.update()] * 4
            job_id = training.current_job_id(db())
            pct = training.progress_fraction(db(), job_id)
            bar = f"\n\n`{'█' * int(pct * 30)}{'░' * (30 - int(pct * 30))}` {pct:.0%}" if job_id else ""
            return (training.progress_markdown(db(), job_id) + bar, training.loss_frame(db(), job_id),
                    training.jobs_frame(db()), training.adapters_frame(db()))

        poll_outputs = [tr_progress, tr_loss, tr_jobs, ad_table]
        timer.tick(train_poll, None, poll_outputs, api_name=False, show_progress="hidden")

        def do_start(method, rank, epochs, force, objective, request: gr.Request):
            overrides = {"method": method or None, "epochs": epochs or None, "objective": objective or None}
            if rank:
                overrides["rank"] = int(rank) if str(rank).strip().isdigit() else str(rank).strip()
            outcome = training.start_retrain(db(), who(request), force=bool(force), overrides=overrides)
            return [("✅ " if outcome.ok else "⛔ ") + outcome.message] + list(train_poll(request))

        tr_start.click(do_start, [tr_method, tr_rank, tr_epochs, tr_force, tr_objective], [tr_msg] + poll_outputs,
                       api_name="retrain")

        def do_cancel(request: gr.Request):
            outcome = training.cancel_job(db(), who(request))
            return [("✅ " if outcome.ok else "⛔ ") + outcome.message] + list(train_poll(request))

        tr_cancel.click(do_cancel, None, [tr_msg] + poll_outputs, api_name="cancel_job")

        def version_choices():
            return [(f"{a} ", a) for a in training.adapters_frame(db())["version"].tolist()]

        def show_verdict(version, request: gr.Request):
            if not who(request).is_admin:
                return "Admins only."
            return training.verdict_markdown(db(), version)

        ad_version.change(show_verdict, ad_version, ad_verdict, api_name="verdict")

        def do_promote(version, force, request: gr.Request):
            outcome = training.promote(db(), who(request), version, force=bool(force))
            return (("✅ " if outcome.ok else "⛔ ") + outcome.message, training.adapters_frame(db()),
                    show_verdict(version, request))

        ad_promote.click(do_promote, [ad_version, ad_force], [ad_msg, ad_table, ad_verdict], api_name="promote")

        def do_rollback(version, request: gr.Request):
            outcome = training.rollback(db(), who(request))
            return (("✅ " if outcome.ok else "⛔ ") + outcome.message, training.adapters_frame(db()),
                    show_verdict(version, request))

        ad_rollback.click(do_rollback, ad_version, [ad_msg, ad_table, ad_verdict], api_name="rollback")

        # ================================================================== on page load
        def on_load(request: gr.Request):
            viewer = who(request)
            role = "admin" if viewer.is_admin else "curator"
            logout = " · [log out](logout)" if config.login_required else ""
            head = f"Signed in as **{viewer.name}** ({role}){logout}"
            admin = viewer.is_admin
            versions = version_choices() if admin else []
            polled = train_poll(request) if admin else [gr.update()] * 4
            return ([head, gr.update(visible=admin), gr.Timer(active=admin), gr.update(choices=versions)]
                    + refresh("all", "to_review", "", "", "", "")
                    + [ds_load("", "approved")] + list(stats_outputs()) + refresh_adapter_choices() + list(polled))

        demo.load(on_load, None,
                  [whoami, training_tab, timer, ad_version] + refresh_outputs + [ds_table, stats_md, growth_plot,
                                                                                 comp_plot]
                  + [c[0] for c in columns] + poll_outputs, api_name="whoami")
    demo.kbloop_exports = exports  # launch / mount_playground remove them when the server stops
    return demo


def launch(demo: gr.Blocks, *, config: PlaygroundConfig, prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve the playground on config.host:config.port (refused beyond loopback without a login)."""
    check_bind(config)
    return demo.launch(
        server_name=config.host, server_port=config.port, auth=_auth(config),
        auth_message="kbloop playground: sign in with your curator account." if config.auth else None,
        prevent_thread_lock=prevent_thread_lock, share=False, ssr_mode=False, show_error=True, quiet=quiet,
        theme=gr.themes.Soft(), css=CSS, footer_links=[], max_file_size="50mb", app_kwargs=_app_kwargs(demo, config),
    )


def mount_playground(app, demo: gr.Blocks, *, config: PlaygroundConfig, path: str = "/playground"):
    """Mount the playground inside a FastAPI app (`kbloop serve`); the same login rule applies to its host,
    and the same guard to its requests (the rest of `app`, such as /slack/events, is not affected)."""
    check_bind(config)
    return gr.mount_gradio_app(app, demo, path, auth=_auth(config), ssr_mode=False, show_error=True,
                               theme=gr.themes.Soft(), css=CSS, footer_links=[], max_file_size="50mb",
                               app_kwargs=_app_kwargs(demo, config))


def _auth(config: PlaygroundConfig):
    return LoginGate.from_config(config) if config.auth else None


def _app_kwargs(demo: gr.Blocks, config: PlaygroundConfig) -> dict:
    """For the FastAPI app Gradio builds: the guard in front of every route, and a lifespan that removes
    the export folders when the server stops."""
    from starlette.middleware import Middleware

    exports = getattr(demo, "kbloop_exports", None)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        try:
            yield
        finally:
            if exports is not None:
                exports.close()

    return {"middleware": [Middleware(PlaygroundGuard, loopback_only=not config.login_required)],
            "lifespan": lifespan}
