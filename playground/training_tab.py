"""Training tab (admins): start or cancel a retraining job, follow its progress and loss, and promote or roll back
adapters past the gate, for the shared adapter or a team's (the "Team" dropdown; promoting acts on the version's own
team). The decisions are playground.training's; this module lays them out and wires them up
(api names: retrain, cancel_job, verdict, promote, rollback).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from playground import teams, training
from playground.context import TabContext
from store.teams import SHARED


@dataclass(frozen=True)
class TrainingTab:
    tab: gr.Tab  # hidden until an admin loads the page
    timer: gr.Timer  # polls the current job, active for admins
    version: gr.Dropdown  # the adapter versions to promote
    team: gr.Dropdown  # the team whose adapter retraining and rollback act on
    poll_outputs: list  # what `poll` fills: progress, loss plot, jobs, adapters
    poll: Callable[[gr.Request], list | tuple]
    version_choices: Callable[[], list]


def build_training_tab(ctx: TabContext) -> TrainingTab:
    """The Training tab and its events, inside the caller's gr.Blocks."""
    config, db, who = ctx.config, ctx.db, ctx.who

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
            tr_team = gr.Dropdown(teams.move_choices(db()), value=SHARED, label="Team", scale=1,
                                  allow_custom_value=True, elem_id="training-team",
                                  info="Retrain and roll back the shared adapter, or a team's (trained on the shared "
                                       "and the team's examples)")
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

    def team_of(value) -> str | None:
        return None if value in (None, "", SHARED) else value

    tr_team.focus(lambda: gr.update(choices=teams.move_choices(db())), None, tr_team, api_name=False)

    def do_start(method, rank, epochs, force, objective, team, request: gr.Request):
        overrides = {"method": method or None, "epochs": epochs or None, "objective": objective or None}
        if rank:
            overrides["rank"] = int(rank) if str(rank).strip().isdigit() else str(rank).strip()
        outcome = training.start_retrain(db(), who(request), force=bool(force), overrides=overrides, team=team_of(team))
        return [("✅ " if outcome.ok else "⛔ ") + outcome.message] + list(train_poll(request))

    tr_start.click(do_start, [tr_method, tr_rank, tr_epochs, tr_force, tr_objective, tr_team], [tr_msg] + poll_outputs,
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

    def do_rollback(version, team, request: gr.Request):
        outcome = training.rollback(db(), who(request), team=team_of(team))
        return (("✅ " if outcome.ok else "⛔ ") + outcome.message, training.adapters_frame(db()),
                show_verdict(version, request))

    ad_rollback.click(do_rollback, [ad_version, tr_team], [ad_msg, ad_table, ad_verdict], api_name="rollback")

    return TrainingTab(tab=training_tab, timer=timer, version=ad_version, team=tr_team, poll_outputs=poll_outputs, poll=train_poll,
                       version_choices=version_choices)
