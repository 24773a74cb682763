"""Search tab: the passages the bot retrieves for a question, with the evidence behind each rank. The search is
playground.search's; this module lays it out and wires it up (api name: search).
"""

from __future__ import annotations

import gradio as gr

from playground import search, teams
from playground.context import TabContext
from store import StoreError


def build_search_tab(ctx: TabContext) -> None:
    """The Search tab and its events, inside the caller's gr.Blocks."""
    db = ctx.db

    with gr.Tab("Search", id="search"):
        gr.Markdown("The passages the bot retrieves for a question, best first, with the evidence behind each "
                    "rank (the same search as `kbloop kb search`), as a question of the chosen team gets them: "
                    "shared and that team's passages; as no team, shared ones only.")
        with gr.Row():
            search_q = gr.Textbox(label="Question", scale=4, elem_id="search-question")
            search_team = gr.Dropdown(teams.ask_choices(db()), value=teams.NO_TEAM, label="As team", scale=1,
                                      allow_custom_value=True, elem_id="search-team")
            search_btn = gr.Button("Search", variant="primary", scale=0, elem_id="search-run")
        search_table = gr.Dataframe(headers=search.HEADERS, interactive=False, wrap=True, elem_id="search-results")
        search_msg = gr.Markdown(elem_id="search-summary")

    def do_search(question, team):
        try:
            return search.search(db(), question, team=teams.as_team(db(), team))
        except StoreError as exc:
            return [], f"⛔ {exc}"

    search_btn.click(do_search, [search_q, search_team], [search_table, search_msg], api_name="search")
    search_q.submit(do_search, [search_q, search_team], [search_table, search_msg], api_name=False)
    search_team.focus(lambda: gr.update(choices=teams.ask_choices(db())), None, search_team, api_name=False)
