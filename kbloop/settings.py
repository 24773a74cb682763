"""Settings: one typed object built from the environment and a `.env` file in the working directory.

The variable names are a promise to users (see ARCHITECTURE.md, "Configuration"). Everything else in
kbloop receives the pieces it needs from here instead of reading the environment itself.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from store.errors import KbloopError


class SettingsError(KbloopError):
    """A missing or malformed setting; the message names the variable and what is expected."""


# A playground password shorter than this is refused when the settings load: the login is all that stands
# between the network and the training data (issue 16).
MIN_PLAYGROUND_PASSWORD = 12


def check_playground_password(user: str, password: str) -> None:
    """Raise ValueError, naming the user and never the password, if `password` is too short."""
    if len(password) < MIN_PLAYGROUND_PASSWORD:
        raise ValueError(f"the password of user {user!r} is shorter than {MIN_PLAYGROUND_PASSWORD} characters; "
                         "use a longer one (a passphrase)")


def _split_csv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [v.strip() for v in value if v.strip()]
    return [part.strip() for part in value.split(",") if part.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    kbloop_home: Path = Field(default=Path("./kbloop-data"), alias="KBLOOP_HOME")
    kbloop_db: Path | None = Field(default=None, alias="KBLOOP_DB")
    base_model: str = Field(default="Qwen/Qwen2.5-0.5B-Instruct", alias="KBLOOP_BASE_MODEL")
    # Stored as raw strings: pydantic-settings would otherwise try to parse lists as JSON.
    admins_raw: str = Field(default="", alias="KBLOOP_ADMINS")
    notify_channel: str | None = Field(default=None, alias="KBLOOP_NOTIFY_CHANNEL")
    playground_auth_raw: str | None = Field(default=None, alias="KBLOOP_PLAYGROUND_AUTH")
    playground_admins_raw: str = Field(default="", alias="KBLOOP_PLAYGROUND_ADMINS")
    # Without a login the playground's user is "local" (anyone who can reach 127.0.0.1 on this machine):
    # a curator, and an admin only when this says so.
    playground_local_admin: bool = Field(default=False, alias="KBLOOP_PLAYGROUND_LOCAL_ADMIN")
    slack_bot_token: str | None = Field(default=None, alias="SLACK_BOT_TOKEN")
    slack_signing_secret: str | None = Field(default=None, alias="SLACK_SIGNING_SECRET")
    slack_app_token: str | None = Field(default=None, alias="SLACK_APP_TOKEN")
    slack_api_url: str = Field(default="https://slack.com/api/", alias="KBLOOP_SLACK_API_URL")
    # The embedder for semantic search (finetune.serving.embedding): multilingual-e5-small (bundled, the default),
    # all-MiniLM-L6-v2 (bundled, English), or a sentence-transformers model id or folder.
    embedding_model: str = Field(default="multilingual-e5-small", alias="KBLOOP_EMBEDDING_MODEL")
    # Where embedded texts are kept across processes (finetune.serving.embedding): a file path, or `off`.
    embedding_cache: str = Field(default="", alias="KBLOOP_EMBEDDING_CACHE")
    # Generation on a vLLM server instead of in-process (finetune.serving.vllm, docs/scaling.md).
    vllm_url: str | None = Field(default=None, alias="KBLOOP_VLLM_URL")
    vllm_model: str | None = Field(default=None, alias="KBLOOP_VLLM_MODEL")
    vllm_adapter_dir: str | None = Field(default=None, alias="KBLOOP_VLLM_ADAPTER_DIR")

    @field_validator("base_model")
    @classmethod
    def _base_model_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("expected an HF model id, a local model directory, or 'tiny'")
        return v.strip()

    @field_validator("embedding_model")
    @classmethod
    def _embedding_model_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("expected multilingual-e5-small, all-MiniLM-L6-v2, a sentence-transformers id or a folder")
        return v.strip()

    @field_validator("playground_auth_raw")
    @classmethod
    def _auth_pairs(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        seen: set[str] = set()
        for i, pair in enumerate(_split_csv(v), start=1):
            user, sep, password = pair.partition(":")
            # Never quote the entry: without its ':' it may be a password.
            if not sep or not user.strip() or not password:
                raise ValueError(f"expected user:password pairs separated by commas; entry {i} is not "
                                 "(it needs a user, a ':' and a password)")
            if user in seen:
                raise ValueError(f"user {user!r} appears twice")
            seen.add(user)
            check_playground_password(user, password)
        return v

    @field_validator("slack_api_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("expected an http(s) URL such as https://slack.com/api/")
        return v if v.endswith("/") else v + "/"

    @field_validator("vllm_url")
    @classmethod
    def _vllm_url(cls, v: str | None) -> str | None:
        if not v or not v.strip():
            return None
        v = v.strip().rstrip("/")
        if not v.startswith(("http://", "https://")):
            raise ValueError("expected the base URL of a vLLM server, such as http://gpu-box:8000")
        return v.removesuffix("/v1")

    @field_validator("vllm_model", "vllm_adapter_dir")
    @classmethod
    def _empty_is_unset(cls, v: str | None) -> str | None:
        return v.strip() if v and v.strip() else None

    @field_validator("slack_bot_token")
    @classmethod
    def _bot_token(cls, v: str | None) -> str | None:
        if v and not v.startswith("xoxb-"):
            raise ValueError("expected a bot token starting with xoxb-")
        return v or None

    @field_validator("slack_app_token")
    @classmethod
    def _app_token(cls, v: str | None) -> str | None:
        if v and not v.startswith("xapp-"):
            raise ValueError("expected an app-level token starting with xapp-")
        return v or None

    # Derived values -------------------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.kbloop_db if self.kbloop_db is not None else self.kbloop_home / "kbloop.db"

    @property
    def adapters_dir(self) -> Path:
        return self.kbloop_home / "adapters"

    @property
    def models_dir(self) -> Path:
        return self.kbloop_home / "models"

    @property
    def embedding_cache_path(self) -> Path | None:
        value = self.embedding_cache.strip()
        if value.lower() == "off":
            return None
        return Path(value).expanduser() if value else self.models_dir / "embedding-cache.sqlite"

    @property
    def admins(self) -> list[str]:
        return _split_csv(self.admins_raw)

    @property
    def playground_admins(self) -> list[str]:
        return _split_csv(self.playground_admins_raw)

    @property
    def playground_auth(self) -> list[tuple[str, str]]:
        return [tuple(p.split(":", 1)) for p in _split_csv(self.playground_auth_raw)]  # type: ignore[misc]


def load_settings(**overrides) -> Settings:
    """Build the settings, turning pydantic's report into one line per bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = err["loc"][0] if err["loc"] else "?"
            alias = Settings.model_fields[field].alias if field in Settings.model_fields else field
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{alias}: {msg}")
        raise SettingsError("\n".join(lines)) from None


ENV_EXAMPLE = """\
# kbloop settings. Copy to .env in the folder you run kbloop from, and uncomment what you need.

# Folder for the database, adapters and cached models.
# KBLOOP_HOME=./kbloop-data
# Database path (defaults to $KBLOOP_HOME/kbloop.db).
# KBLOOP_DB=
# Base model: an HF model id, a local model directory, or `tiny` (offline, random weights, for trying).
# KBLOOP_BASE_MODEL=Qwen/Qwen2.5-0.5B-Instruct

# Slack user ids allowed to /kb-retrain, /kb-rollback and promote (comma separated). Empty: nobody.
# KBLOOP_ADMINS=U012ABCDEF,U034GHIJKL
# Channel id where training notices are posted.
# KBLOOP_NOTIFY_CHANNEL=C0123456789

# Playground login: user:password pairs, comma separated; passwords of at least 12 characters.
# Repeated failed sign-ins make the next attempt wait (per user and per address).
# Unset: no login; the playground then listens on loopback only and answers only requests addressed to
# localhost, 127.0.0.1 or [::1] (a page elsewhere cannot reach it by DNS rebinding).
# KBLOOP_PLAYGROUND_AUTH=alice:a-long-passphrase,bob:another-long-one
# Playground users who may train, cancel, promote and roll back.
# KBLOOP_PLAYGROUND_ADMINS=alice
# Without a login, may the local user (anyone who can reach 127.0.0.1 on this machine) train, cancel,
# promote and roll back? Default false: curating only.
# KBLOOP_PLAYGROUND_LOCAL_ADMIN=false

# Slack credentials (Basic Information and OAuth & Permissions pages of your Slack app).
# SLACK_BOT_TOKEN=xoxb-...
# SLACK_SIGNING_SECRET=...
# Set this to use Socket Mode (no public URL needed):
# SLACK_APP_TOKEN=xapp-...
# Base URL of Slack's Web API (tests, proxies).
# KBLOOP_SLACK_API_URL=https://slack.com/api/

# Embedder for semantic search: multilingual-e5-small (bundled, English and Chinese, the default),
# all-MiniLM-L6-v2 (bundled, English only), or a sentence-transformers model id or folder
# (e.g. BAAI/bge-m3, downloaded from the hub). Changing it re-embeds the knowledge base.
# KBLOOP_EMBEDDING_MODEL=multilingual-e5-small

# Generate on a vLLM server (started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) instead of
# in this process; see docs/scaling.md. Adapters are loaded into it under their version names.
# KBLOOP_VLLM_URL=http://gpu-box:8000
# The name vLLM serves the base model under (defaults to KBLOOP_BASE_MODEL).
# KBLOOP_VLLM_MODEL=Qwen/Qwen2.5-7B-Instruct
# $KBLOOP_HOME/adapters as the vLLM machine sees it (a shared volume); unset: the same path as here.
# KBLOOP_VLLM_ADAPTER_DIR=/mnt/kbloop/adapters
"""
