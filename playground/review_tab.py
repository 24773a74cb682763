"""Review tab: the queue of voted answers and pending examples, the open item beside its near-duplicates, and the
curator's decisions (approve, redact, reject, merge). The decisions are playground.review's; this module lays
them out and wires them up (api names: queue, open_item, next_item, approve, reject, merge, redact).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from playground import review, teams
from playground.context import TabContext
from playground.review import QueueFilter
from store.interactions import review_channels

STATUS_CHOICES = [("to review", "to_review"), ("unreviewed", "unreviewed"), ("pending correction", "pending"),
                  ("approved", "approved"), ("rejected", "rejected"), ("merged", "merged"), ("all", "all")]
VOTE_CHOICES = [("all", "all"), ("👎", "down"), ("👍 only", "up")]
QUEUE_COLUMNS = ["key", "votes", "status", "question", "corrected", "channel", "team", "created_at"]


def _queue_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"key": r["key"], "votes": f"👍{r['up']} 👎{r['down']}", "status": r["status"],
                          "question": r["question"][:140], "corrected": "✎" if r["corrected"] else "",
                          "channel": r["channel"], "team": r["team"], "created_at": r["created_at"][:16].replace("T", " ")}
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




@dataclass(frozen=True)
class ReviewTab:
    outputs: list  # what `refresh` fills: the counts, the queue, the channel choices, the first item to review
    refresh: Callable[..., list]  # (vote, status, channel, since, until, text, team) -> values for `outputs`


def build_review_tab(ctx: TabContext) -> ReviewTab:
    """The Review tab and its events, inside the caller's gr.Blocks."""
    config, db, who = ctx.config, ctx.db, ctx.who

    def current_filter(vote, status, channel, since, until, text, team) -> QueueFilter:
        return QueueFilter(vote=vote or "all", status=status or "to_review", channel=channel or "",
                           since=since or "", until=until or "", text=text or "", team=team or "")

    def load_queue(vote, status, channel, since, until, text, team):
        try:
            rows = review.queue(db(), current_filter(vote, status, channel, since, until, text, team),
                                limit=config.queue_page_size)
            note = ""
        except review.StoreError as exc:
            rows, note = [], f"\n\n⚠️ {exc}"
        return rows, review.counts_line(db()) + note

    def open_key(key: str) -> list:
        if not key:
            return _item_view(None)
        return _item_view(review.open_item(db(), key.strip()))

    with gr.Tab("Review", id="review"):
        with gr.Row():
            f_vote = gr.Radio(VOTE_CHOICES, value="all", label="Vote", scale=1)
            f_status = gr.Dropdown(STATUS_CHOICES, value="to_review", label="Status", scale=1)
            f_channel = gr.Dropdown([("any", "")], value="", label="Channel", scale=1, allow_custom_value=True)
            f_since = gr.Textbox(label="From (YYYY-MM-DD)", scale=1)
            f_until = gr.Textbox(label="To (YYYY-MM-DD)", scale=1)
            f_text = gr.Textbox(label="Text", placeholder="search questions, answers, corrections", scale=2)
            f_team = gr.Dropdown(teams.filter_choices(db()), value=teams.NO_TEAM, label="Team", scale=1,
                                 allow_custom_value=True, elem_id="review-team")
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

    filters = [f_vote, f_status, f_channel, f_since, f_until, f_text, f_team]
    item_outputs = [item_key, item_status, item_header, item_question, bot_answer, item_sources, item_corrections,
                    item_flags, answer_tb, confirm_cb, dups_md, merge_dd]

    def refresh(vote, status, channel, since, until, text, team=teams.NO_TEAM):
        rows, counts = load_queue(vote, status, channel, since, until, text, team)
        first = next((r["key"] for r in rows if r["status"] in review.TO_REVIEW), rows[0]["key"] if rows else "")
        channels = [("any", "")] + [(c, c) for c in review_channels(db())]
        return ([counts, _queue_frame(rows), gr.update(choices=channels), gr.update(choices=teams.filter_choices(db()))]
                + open_key(first))

    refresh_outputs = [counts_md, queue_df, f_channel, f_team] + item_outputs
    refresh_btn.click(refresh, filters, refresh_outputs, api_name="queue")
    for comp in (f_vote, f_status, f_channel, f_team):
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

    def next_item(vote, status, channel, since, until, text, team=teams.NO_TEAM):
        rows, _ = load_queue(vote, status, channel, since, until, text, team)
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
                   team=teams.NO_TEAM, request: gr.Request = None):
        outcome = review.approve(db(), who(request), key, answer=answer, question=question, confirm=confirm,
                                 expected_status=seen_status or None)
        return after(outcome, (vote, status, channel, since, until, text, team), key)

    def do_reject(key, seen_status, vote, status, channel, since, until, text, team=teams.NO_TEAM,
                  request: gr.Request = None):
        outcome = review.reject(db(), who(request), key, expected_status=seen_status or None)
        return after(outcome, (vote, status, channel, since, until, text, team), key)

    def do_merge(key, seen_status, into, use_answer, answer, confirm, vote, status, channel, since, until, text,
                 team=teams.NO_TEAM, request: gr.Request = None):
        outcome = review.merge(db(), who(request), key, into, answer=answer if use_answer else None,
                               confirm=confirm, expected_status=seen_status or None)
        return after(outcome, (vote, status, channel, since, until, text, team), key)

    approve_btn.click(do_approve, [item_key, item_status, item_question, answer_tb, confirm_cb] + filters,
                      decision_outputs, api_name="approve")
    reject_btn.click(do_reject, [item_key, item_status] + filters, decision_outputs, api_name="reject")
    merge_btn.click(do_merge, [item_key, item_status, merge_dd, merge_answer_cb, answer_tb, confirm_cb] + filters,
                    decision_outputs, api_name="merge")

    def do_redact(text):
        new, msg = review.redact_answer(text)
        return new, f"✂️ {msg}"

    redact_btn.click(do_redact, answer_tb, [answer_tb, review_msg], api_name="redact")

    return ReviewTab(outputs=refresh_outputs, refresh=refresh)
