"""The bot's one config object, built once from kbloop's settings and passed down."""

from __future__ import annotations

from dataclasses import dataclass

from store.errors import KbloopError


class BotConfigError(KbloopError):
    """A missing or malformed bot setting; the message names the variable."""


@dataclass(frozen=True, kw_only=True)
class BotConfig:
    bot_token: str
    signing_secret: str | None  # required in HTTP mode; Socket Mode does not sign requests
    app_token: str | None = None
    api_url: str = "https://slack.com/api/"
    admins: tuple[str, ...] = ()
    notify_channel: str | None = None
    # Questions per user per window; beyond that the user is told to slow down (nothing is generated).
    rate_limit_questions: int = 6
    rate_limit_window_s: float = 60.0
    # Threads that wait on the engine and post answers; the engine itself batches generation.
    answer_workers: int = 8
    # Threads bolt runs listeners on; listeners only filter, dedupe and hand over, so acks stay fast.
    listener_workers: int = 32
    # chat.postMessage / chat.update retries after a 429 (honouring Retry-After).
    rate_limit_retries: int = 3
    # A progress notice for a training job is refreshed at most this often (one message, edited).
    progress_interval_s: float = 10.0
    # A streamed answer's message is updated at most this often (chat.startStream / appendStream / stopStream).
    stream_interval_s: float = 0.5

    @classmethod
    def from_settings(cls, settings, *, http: bool = True, **overrides) -> BotConfig:
        """From kbloop.settings.Settings. Raises BotConfigError naming the first missing variable."""
        if not settings.slack_bot_token:
            raise BotConfigError("SLACK_BOT_TOKEN is not set: the bot token (xoxb-…) from your Slack app's "
                                 "OAuth & Permissions page")
        if http and not settings.slack_signing_secret:
            raise BotConfigError("SLACK_SIGNING_SECRET is not set: the signing secret from your Slack app's "
                                 "Basic Information page (needed in HTTP mode)")
        values = dict(
            bot_token=settings.slack_bot_token, signing_secret=settings.slack_signing_secret,
            app_token=settings.slack_app_token, api_url=settings.slack_api_url, admins=tuple(settings.admins),
            notify_channel=settings.notify_channel or None,
        )
        values.update(overrides)
        return cls(**values)

    def is_admin(self, user_id: str | None) -> bool:
        return bool(user_id) and user_id in self.admins
