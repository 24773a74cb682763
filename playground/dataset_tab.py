"""Dataset tab: search and edit the training examples, import and export files, and the dataset's statistics.
The decisions are playground.dataset's; this module lays them out and wires them up (api names: dataset,
save_example, remove_example, import_examples, export), and keeps the folders exports are downloaded from.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from playground import dataset, teams
from playground.context import TabContext
from store.examples import get_example
from store.teams import SHARED


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



@dataclass(frozen=True)
class DatasetTab:
    outputs: list  # what `show` fills: the examples table, the statistics and their two plots
    show: Callable[[str, str], tuple]  # (search, status) -> values for `outputs`
    exports: ExportFolders


def build_dataset_tab(ctx: TabContext) -> DatasetTab:
    """The Dataset tab and its events, inside the caller's gr.Blocks."""
    db, who = ctx.db, ctx.who
    exports = ExportFolders(ctx.config.export_dir, keep=ctx.config.export_keep)

    with gr.Tab("Dataset", id="dataset") as dataset_tab:
        with gr.Row():
            ds_search = gr.Textbox(label="Search", placeholder="text in question or answer", scale=3,
                                   elem_id="dataset-search")
            ds_status = gr.Dropdown(["approved", "pending", "rejected", "all"], value="approved", label="Status",
                                    scale=1)
            ds_team = gr.Dropdown(teams.filter_choices(db()), value=teams.NO_TEAM, label="Team", scale=1,
                                  allow_custom_value=True, elem_id="dataset-team")
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
            with gr.Row():
                ds_move_team = gr.Dropdown(teams.move_choices(db()), value=SHARED, scale=2, allow_custom_value=True,
                                           label="Belongs to (a team's example answers and trains only that team)")
                ds_move = gr.Button("Move", scale=0)
            ds_msg = gr.Markdown()
        with gr.Row():
            with gr.Column():
                gr.Markdown("#### Import\nJSONL, a JSON array of records, CSV or Excel: instruction/input/output, question/answer, messages "
                            "or ShareGPT conversations. "
                            "A file with any bad line is refused whole.")
                imp_file = gr.File(label="File", file_types=[".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".xlsx"])
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

    def ds_load(search, status, team=teams.NO_TEAM):
        return dataset.examples_table(db(), search=search or "", status=status or "approved", team=team or None)

    listing = [ds_search, ds_status, ds_team]
    ds_refresh.click(ds_load, listing, ds_table, api_name="dataset")
    ds_search.submit(ds_load, listing, ds_table, api_name=False)
    ds_status.change(ds_load, listing, ds_table, api_name=False)
    ds_team.change(ds_load, listing, ds_table, api_name=False)
    ds_team.focus(lambda: gr.update(choices=teams.filter_choices(db())), None, ds_team, api_name=False)

    def ds_select(frame: pd.DataFrame, evt: gr.SelectData):
        row = evt.row_value if evt.row_value else frame.iloc[evt.index[0]].tolist()
        ex_id, q, inp, a = dataset.load_example(db(), row[0])
        owner = get_example(db(), ex_id).team or SHARED
        return str(ex_id), q, inp, a, False, gr.update(choices=teams.move_choices(db()), value=owner)

    ds_table.select(ds_select, ds_table, [ds_id, ds_question, ds_input, ds_answer, ds_confirm, ds_move_team],
                    api_name=False)

    def ds_do_save(example_id, question, input, answer, confirm, search, status, team, request: gr.Request):
        outcome = dataset.save_example(db(), who(request), example_id, question=question, answer=answer,
                                       input=input, confirm=confirm)
        return ("✅ " if outcome.ok else "⛔ ") + outcome.message, ds_load(search, status, team)

    ds_save.click(ds_do_save, [ds_id, ds_question, ds_input, ds_answer, ds_confirm] + listing,
                  [ds_msg, ds_table], api_name="save_example")

    def ds_do_remove(example_id, search, status, team, request: gr.Request):
        outcome = dataset.remove_example(db(), who(request), example_id)
        return ("✅ " if outcome.ok else "⛔ ") + outcome.message, ds_load(search, status, team)

    ds_remove.click(ds_do_remove, [ds_id] + listing, [ds_msg, ds_table], api_name="remove_example")

    def ds_do_move(example_id, target, search, status, team, request: gr.Request):
        outcome = teams.assign(db(), who(request), example_id, target)
        return ("✅ " if outcome.ok else "⛔ ") + outcome.message, ds_load(search, status, team)

    ds_move.click(ds_do_move, [ds_id, ds_move_team] + listing, [ds_msg, ds_table], api_name="assign_team")

    def stats_outputs():
        return dataset.stats_markdown(db()), dataset.growth_frame(db()), dataset.composition_frame(db())

    def do_import(file, status, search, shown_status, team, request: gr.Request):
        path = file if isinstance(file, (str, Path)) else getattr(file, "name", None)
        name = getattr(file, "orig_name", None) or (Path(path).name if path else None)
        outcome = dataset.import_file(db(), who(request), path, display_name=name, status=status)
        return (outcome.message, ds_load(search, shown_status, team)) + stats_outputs()

    imp_btn.click(do_import, [imp_file, imp_status, ds_search, ds_status, ds_team],
                  [imp_msg, ds_table, stats_md, growth_plot, comp_plot], api_name="import_examples")

    def do_export(format):
        path, outcome = dataset.export_file(db(), format, out_dir=exports.new())
        return (path or None), outcome.message

    exp_btn.click(do_export, exp_fmt, [exp_file, exp_msg], api_name="export")

    def on_dataset_tab(search, status, team=teams.NO_TEAM):
        return (ds_load(search, status, team),) + stats_outputs()

    # Decisions in the review tab change the dataset: show it fresh whenever the tab is opened.
    dataset_tab.select(on_dataset_tab, listing, [ds_table, stats_md, growth_plot, comp_plot], api_name=False)

    return DatasetTab(outputs=[ds_table, stats_md, growth_plot, comp_plot], show=on_dataset_tab, exports=exports)
