"""Chat tab: ask up to three models (base, active adapter, a candidate) the same question side by side, and vote
on their answers. The answers and votes are playground.chat's; this module lays them out and wires them up (api
names: ask, vote).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from finetune.serving.protocol import AnswerEngine
from playground import chat, teams
from playground.context import TabContext
from store import StoreError


@dataclass(frozen=True)
class ChatTab:
    outputs: list  # the three columns' model dropdowns and the team dropdown, which `model_choices` fills
    model_choices: Callable[[], list]


def build_chat_tab(ctx: TabContext, engine: AnswerEngine | None) -> ChatTab:
    """The Chat tab and its events, inside the caller's gr.Blocks. `engine` may be None: asking then says so."""
    db, who = ctx.db, ctx.who

    with gr.Tab("Chat", id="chat"):
        gr.Markdown("Ask the model. Compare the base model, the active adapter and a candidate on the same "
                    "question; 👍 / 👎 are stored as feedback (source: playground) and land in the review queue. "
                    "Asked as a team, a question sees the shared and that team's documents and approved answers, "
                    "and \"active\" is the team's adapter, as in its Slack channels; as no team, shared ones only.")
        with gr.Row():
            chat_q = gr.Textbox(label="Question", scale=4, elem_id="chat-question")
            chat_team = gr.Dropdown(teams.ask_choices(db()), value=teams.NO_TEAM, label="Ask as team", scale=1,
                                    allow_custom_value=True, elem_id="chat-team")
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
        # The `vote` endpoint for scripts (gradio_client): the same vote as the buttons, by interaction id.
        vote_id = gr.Number(visible=False, precision=0)
        vote_value = gr.Number(visible=False, precision=0)
        vote_corr = gr.Textbox(visible=False)
        vote_btn = gr.Button(visible=False)

    def refresh_adapter_choices():
        choices = chat.adapter_choices(db()) + [("(none)", "")]
        cand = chat.default_candidate(db())
        return [gr.update(choices=choices), gr.update(choices=choices),
                gr.update(choices=choices, value=cand or ""), gr.update(choices=teams.ask_choices(db()))]

    def do_ask(question, model_a, model_b, model_c, history_a, history_b, history_c, team, request: gr.Request):
        chosen = [model_a, model_b, model_c]
        try:
            team = teams.as_team(db(), team)
        except StoreError as exc:
            return [history_a, history_b, history_c] + [None] * 3 + [f"⛔ {exc}"]
        answers = chat.ask(engine, who(request), question, [x for x in chosen if x], team=team)
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

    chat_inputs = [chat_q] + [c[0] for c in columns] + [c[1] for c in columns] + [chat_team]
    chat_outputs = [c[1] for c in columns] + [c[5] for c in columns] + [chat_msg]
    chat_btn.click(do_ask, chat_inputs, chat_outputs, api_name="ask")
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

    vote_btn.click(api_vote, [vote_id, vote_value, vote_corr], chat_msg, api_name="vote")

    return ChatTab(outputs=[c[0] for c in columns] + [chat_team], model_choices=refresh_adapter_choices)
