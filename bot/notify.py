"""SlackJobNotifier: tells Slack about a retraining job (implements finetune.jobs.notices.JobNotifier).

Where: the channel the job was requested from (`job.reply_channel`, in `reply_thread_ts` if set) and
KBLOOP_NOTIFY_CHANNEL. When the bot cannot post in the requester's channel (not a member, archived …)
the requester gets a DM instead. Progress is one message per place, edited in place (chat.update) at
most every `progress_interval_s`, so a long training run does not flood the channel.

A notifier never raises: a Slack outage must not fail the training job. Failures are logged.
"""

from __future__ import annotations

import logging
import threading
import time

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

import bot.messages as messages
from bot.blocks import escape_mrkdwn, plain_message

log = logging.getLogger("kbloop.bot.notify")

# Errors meaning "this channel is not a place we can post": fall back to a DM to the requester.
UNREACHABLE = {"not_in_channel", "channel_not_found", "is_archived", "restricted_action", "cannot_reply_to_message"}


class SlackJobNotifier:
    def __init__(self, *, client: WebClient, notify_channel: str | None, progress_interval_s: float = 10.0,
                 clock=time.monotonic):
        self.client = client
        self.notify_channel = notify_channel
        self.progress_interval_s = progress_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        # job id -> {channel: ts of its progress message}; job id -> last progress post time
        self._progress_ts: dict[int, dict[str, str]] = {}
        self._last_progress: dict[int, float] = {}

    @classmethod
    def from_config(cls, config) -> SlackJobNotifier:
        """From a bot.BotConfig (e.g. in `kbloop worker`, a process without the bolt app)."""
        from bot.app import make_web_client

        return cls(client=make_web_client(config), notify_channel=config.notify_channel,
                   progress_interval_s=config.progress_interval_s)

    # JobNotifier ----------------------------------------------------------------------------------
    def job_started(self, job) -> None:
        self._post_everywhere(job, messages.job_started(job.id))

    def job_progress(self, job, progress: dict) -> None:
        now = self._clock()
        with self._lock:
            last = self._last_progress.get(job.id)
            if last is not None and now - last < self.progress_interval_s:
                return
            self._last_progress[job.id] = now
        text = messages.job_progress(job.id, escape_mrkdwn(_describe_progress(progress)))
        posted = self._progress_ts.setdefault(job.id, {})
        for channel, thread_ts in self._targets(job):
            try:
                if channel in posted:
                    self.client.chat_update(channel=channel, ts=posted[channel], text=text)
                else:
                    posted[channel] = self._post(job, channel, thread_ts, text)
            except Exception:  # noqa: BLE001 - never fail the job for a notice
                log.exception("job %s: progress notice to %s failed", job.id, channel)

    def job_finished(self, job, outcome: dict) -> None:
        self._post_everywhere(job, outcome_text(job.id, outcome))
        with self._lock:
            self._progress_ts.pop(job.id, None)
            self._last_progress.pop(job.id, None)

    # Posting --------------------------------------------------------------------------------------
    def _targets(self, job) -> list[tuple[str, str | None]]:
        targets: list[tuple[str, str | None]] = []
        if job.reply_channel:
            targets.append((job.reply_channel, job.reply_thread_ts))
        elif job.requester and job.requester.startswith(("U", "W")):
            targets.append((job.requester, None))  # chat.postMessage to a user id lands in the app DM
        if self.notify_channel and self.notify_channel not in [c for c, _ in targets]:
            targets.append((self.notify_channel, None))
        return targets

    def _post(self, job, channel: str, thread_ts: str | None, text: str) -> str | None:
        blocks, fallback = plain_message(text)
        try:
            return self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=fallback,
                                                blocks=blocks)["ts"]
        except SlackApiError as exc:
            error = exc.response.get("error") if exc.response is not None else None
            requester = job.requester or ""
            if error in UNREACHABLE and channel == job.reply_channel and requester.startswith(("U", "W")):
                log.info("job %s: cannot post in %s (%s); sending to %s directly", job.id, channel, error, requester)
                return self.client.chat_postMessage(channel=requester, text=fallback, blocks=blocks)["ts"]
            raise

    def _post_everywhere(self, job, text: str) -> None:
        for channel, thread_ts in self._targets(job):
            try:
                self._post(job, channel, thread_ts, text)
            except Exception:  # noqa: BLE001
                log.exception("job %s: notice to %s failed", job.id, channel)


def _describe_progress(progress: dict) -> str:
    from finetune.jobs.queue import describe_progress

    return describe_progress(progress)


def outcome_text(job_id: int, outcome: dict) -> str:
    """The finished-job notice: a headline, the reasons, the metric table (mrkdwn, values escaped)."""
    status = outcome.get("status", "?")
    version = escape_mrkdwn(str(outcome.get("version") or ""))
    if status == "succeeded" and outcome.get("promoted"):
        headline = f":white_check_mark: *{version}* passed the evaluation gate and is now answering questions."
    elif status == "succeeded" and version:
        headline = f":warning: *{version}* was trained but not promoted; the current adapter keeps answering."
    elif status == "succeeded":
        headline = ":information_source: nothing to train: " + escape_mrkdwn(outcome.get("message") or "no change")
    elif status == "cancelled":
        headline = ":no_entry_sign: cancelled."
    else:
        # Notices land in channels everyone reads: the short reason here, the whole error (server paths, the
        # training log's last line) for admins in /kb-status and in the worker's log.
        reason = messages.public_reason(outcome.get("error") or outcome.get("message"))
        headline = f":x: failed: {escape_mrkdwn(reason)} ({messages.DETAILS_FOR_ADMINS})"
    lines = [messages.job_finished(job_id, headline)]
    if outcome.get("message") and status == "succeeded" and version:
        lines.append(escape_mrkdwn(outcome["message"]))
    reasons = (outcome.get("reasons") or []) if status != "failed" else []  # a failure's reason is its error
    for reason in reasons:
        lines.append("• " + escape_mrkdwn(str(reason)))
    table = outcome.get("table")
    if table:
        lines.append("```\n" + escape_mrkdwn(str(table)).replace("```", "'''") + "\n```")
    return "\n".join(lines)
