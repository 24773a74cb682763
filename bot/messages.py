"""Every text the bot shows to people, in one place (wording changes happen here, not in handlers).

Functions take already-escaped values where they embed them in mrkdwn; see bot.blocks.escape_mrkdwn.
"""

from __future__ import annotations

import re

WORKING = ":hourglass_flowing_sand: Looking that up…"
SLASH_WORKING = ":hourglass_flowing_sand: Looking that up… (only you can see this)"
EMPTY_QUESTION = ("Ask me a question about our knowledge base, e.g. `@kbloop how do I request VPN access?`, "
                  "or `/kb how do I request VPN access?`.")
SOURCES_LABEL = "*Sources:*"
NO_SOURCES = "_No knowledge-base passage matched; this answer may be unreliable._"
# Under the sources of an answer whose passages only barely cover the question (the engine's "weak_match").
WEAK_MATCH_NOTE = ":warning: _These passages match the question only weakly: the knowledge base may not cover it._"
VERIFIED_MARK = ":white_check_mark:"
FEEDBACK_PROMPT = "Was this helpful?"
BUTTON_UP = "👍 Helpful"
BUTTON_DOWN = "👎 Not right"
STARTING_NOTE = "_The model is still loading; ask again in a moment._"

# The assistant surface (Slack's AI-app side panel and agent DMs).
ASSISTANT_TITLE = "Knowledge base"
SUGGESTED_TITLE = "Often asked lately:"
# When nothing was asked in the last weeks yet: questions any company knowledge base tends to answer.
DEFAULT_PROMPTS = (
    "How do I request access to a new tool?",
    "Where is the expense policy?",
    "Who do I contact when something is down?",
)
STATUS_WORKING = "is searching the knowledge base…"
# Slack rotates these under the status while the answer is being worked on.
LOADING_MESSAGES = (
    "Searching the knowledge base…",
    "Reading the passages that match…",
    "Checking the approved answers…",
    "Writing the answer…",
)
PROMPT_TITLE_CHARS = 60
THREAD_TITLE_CHARS = 80

THANKS_UP = "Thanks! Your 👍 is recorded."
THANKS_DOWN = "Thanks, your 👎 is recorded."
THANKS_CORRECTION = ("Thanks! Your 👎 and your correction are recorded; a curator will review it before it is "
                     "used for training.")
UNKNOWN_INTERACTION = "I can't find that answer any more, so the vote was not recorded."

MODAL_TITLE = "Improve this answer"
MODAL_SUBMIT = "Send"
MODAL_CLOSE = "Cancel"
MODAL_INTRO = "Your 👎 is recorded. If you know the right answer, a curator will review it and use it for training."
MODAL_QUESTION_LABEL = "Question"
MODAL_INPUT_LABEL = "What would the right answer be?"
MODAL_INPUT_HINT = "Optional. Plain text; a curator reviews it before it is used for training."
CORRECTION_MAX = 3000
CORRECTION_TOO_LONG = f"Please keep the correction under {CORRECTION_MAX} characters."

NOT_ADMIN = "Sorry, only kbloop admins can use `{command}`. Ask one of them, or see `/kb-status`."
NO_ADMINS_CONFIGURED = " (No admins are configured yet: set KBLOOP_ADMINS.)"
RETRAIN_USAGE = ("Usage: `/kb-retrain [force] [method=qlora|lora|full] [rank=N|auto] [epochs=N] "
                 "[from=active|base|VERSION] [objective=sft|kto|dpo] [team=NAME]`; `team=NAME` trains that team's "
                 "adapter on the shared and the team's examples; `objective=kto` trains the active adapter on the 👍 / 👎 "
                 "votes, `objective=dpo` on approved corrections against the answers they replaced; the other `kbloop train` settings work the same way, e.g. "
                 "`lr=1e-4` or `max_length=512`. With no options the defaults are used.")
RETRAIN_NO_BASE = ("`base` cannot be chosen from Slack: jobs train on the server's base model (KBLOOP_BASE_MODEL); "
                   "change it there, or train another base with `kbloop train --base` on the server")
ERROR_NOTE = "Sorry, something went wrong while answering. The error was recorded (ref E{ref})."
TRUNCATED = "\n…_(answer shortened to fit in Slack)_"


def rate_limited(seconds: int) -> str:
    return (f"You're asking faster than I can keep up :sweat_smile: Please try again in about {seconds} s "
            f"(so everyone gets answers quickly).")


def retrain_queued(job_id: int, notify_channel: str | None) -> str:
    where = f" and in <#{notify_channel}>" if notify_channel else ""
    return (f":rocket: Retraining queued as job *#{job_id}*. I'll report progress and the outcome here{where}. "
            "`/kb-status` shows where it stands.")


def retrain_already_active(job_id: int, status: str, requester: str | None, progress: str) -> str:
    who = f", requested by <@{requester}>" if requester and requester.startswith(("U", "W")) else ""
    return (f"A retraining job is already {status}: *#{job_id}*{who}{progress}. "
            "Only one runs at a time; try again when it finishes.")


def retrain_failed_to_queue(reason: str) -> str:
    return f"Could not queue a retraining job: {reason}"


def rolled_back(from_version: str, to_version: str | None, team: str | None = None) -> str:
    target = f"*{to_version}*" if to_version else ("the shared adapter" if team else "the base model (no adapter)")
    whose = f"team *{team}* " if team else ""
    return f":leftwards_arrow_with_hook: Rolled back {whose}from *{from_version}* to {target}. New answers use it now."


ROLLBACK_USAGE = "Usage: `/kb-rollback [team=NAME]`: the shared adapter, or the named team's."


def rollback_failed(reason: str) -> str:
    return f"Nothing was rolled back: {reason}"


def job_started(job_id: int) -> str:
    return f":gear: Training job *#{job_id}* started."


def job_progress(job_id: int, progress_text: str) -> str:
    return f":gear: Training job *#{job_id}*: {progress_text}"


def job_finished(job_id: int, headline: str) -> str:
    return f"Training job *#{job_id}* finished: {headline}"


STATUS_TITLE = "*kbloop status*"
STATUS_NO_ADAPTER = "Active adapter: none (answers come from the base model)."
# One line per team (store.teams): its own active adapter, or the shared one it falls back to.
STATUS_TEAM = "Team *{team}*: {adapter}"
STATUS_TEAM_SHARED = "the shared adapter"
STATUS_NO_JOBS = "No retraining job is queued or running."
STATUS_LAST_JOB = "Last job: "
DETAILS_FOR_ADMINS = "details: admins in `/kb-status`, and the worker's log"

# A server path (/srv/…, ~/…, C:\…) inside an error text.
_PATH = re.compile(r"(?:[A-Za-z]:\\|~/|/)[^\s:;,'\"()]+")


def retrain_invalid(reason: str) -> str:
    return f"Nothing was queued: {reason}."


def public_reason(error: str | None) -> str:
    """What everyone may see of a job's error: its first clause, without server paths or log lines. The
    whole text is for admins (/kb-status) and the logs (issue 16)."""
    first = re.split(r": |; |\n", (error or "").strip(), maxsplit=1)[0]
    first = _PATH.sub("…", first).strip()[:120]
    return first if re.search(r"[A-Za-z]{3}", first) else "an internal error"
