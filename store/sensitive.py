"""Secrets and personal data in text on its way into training data or the knowledge base: one scanner for all.

A model trained on an answer that holds an API key or someone's phone number repeats it to anyone who asks, and a
knowledge-base passage that holds one is quoted into prompts. Every path into the approved examples, the exports and
the KB (import, review, the playground, `kbloop kb import`, training start) asks `find_sensitive` here.

Secrets are found by Yelp's detect-secrets (its plugins' own patterns, offline: its network verification is never
called) plus the few shapes it has no plugin for (see `_SECRET_PATTERNS`). Personal data has no maintained offline
detector (Microsoft's presidio needs spaCy models downloaded), so its patterns are ours, with checksums where the
format has one: Chinese resident ID numbers (ISO 7064 MOD 11-2), IBANs (MOD 97), card numbers (Luhn). A generic word
like "password" alone is not flagged, only "password: <value>".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Finding:
    kind: str  # e.g. "Slack token", "e-mail address"
    start: int
    end: int
    text: str

    @property
    def blocks(self) -> bool:
        """False for contact details (e-mail addresses, phone numbers): answers and KB documents publish role
        mailboxes and hotlines by design, so these are shown for a curator to confirm, never refused outright.
        Secrets and identity or payment numbers block: refused, held as pending, or left out of training."""
        return self.kind not in CONTACT_KINDS

    @property
    def preview(self) -> str:
        """The match with its middle hidden, so the warning itself does not spread the secret."""
        t = self.text
        return t if len(t) <= 6 else f"{t[:4]}…{t[-2:]}"


CONTACT_KINDS = frozenset({"e-mail address", "phone number", "Chinese mobile number"})


# --- Secrets: detect-secrets ----------------------------------------------------------------------------


def _detect_secrets_plugins() -> list[tuple[str, object]]:
    """(kind, plugin) for every detect-secrets plugin that suits prose.

    Left out: the high-entropy plugins (they flag ordinary words and commit hashes in prose) and IPPublicDetector
    (a public IP address is not a secret, and KB documents are full of them).
    """
    from detect_secrets.plugins.artifactory import ArtifactoryDetector
    from detect_secrets.plugins.aws import AWSKeyDetector
    from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
    from detect_secrets.plugins.basic_auth import BasicAuthDetector
    from detect_secrets.plugins.cloudant import CloudantDetector
    from detect_secrets.plugins.discord import DiscordBotTokenDetector
    from detect_secrets.plugins.github_token import GitHubTokenDetector
    from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
    from detect_secrets.plugins.ibm_cloud_iam import IbmCloudIamDetector
    from detect_secrets.plugins.ibm_cos_hmac import IbmCosHmacDetector
    from detect_secrets.plugins.jwt import JwtTokenDetector
    from detect_secrets.plugins.keyword import KeywordDetector
    from detect_secrets.plugins.mailchimp import MailchimpDetector
    from detect_secrets.plugins.npm import NpmDetector
    from detect_secrets.plugins.openai import OpenAIDetector
    from detect_secrets.plugins.private_key import PrivateKeyDetector
    from detect_secrets.plugins.pypi_token import PypiTokenDetector
    from detect_secrets.plugins.sendgrid import SendGridDetector
    from detect_secrets.plugins.slack import SlackDetector
    from detect_secrets.plugins.softlayer import SoftlayerDetector
    from detect_secrets.plugins.square_oauth import SquareOAuthDetector
    from detect_secrets.plugins.stripe import StripeDetector
    from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
    from detect_secrets.plugins.twilio import TwilioKeyDetector

    classes = [ArtifactoryDetector, AWSKeyDetector, AzureStorageKeyDetector, BasicAuthDetector, CloudantDetector,
               DiscordBotTokenDetector, GitHubTokenDetector, GitLabTokenDetector, IbmCloudIamDetector,
               IbmCosHmacDetector, JwtTokenDetector, KeywordDetector, MailchimpDetector, NpmDetector, OpenAIDetector,
               PrivateKeyDetector, PypiTokenDetector, SendGridDetector, SlackDetector, SoftlayerDetector,
               SquareOAuthDetector, StripeDetector, TelegramBotTokenDetector, TwilioKeyDetector]
    return [(cls.secret_type, cls()) for cls in classes]


@lru_cache(maxsize=1)
def _plugins() -> tuple:
    from detect_secrets.plugins.keyword import CONFIG_DENYLIST_REGEX_TO_GROUP

    # The keyword plugin reads `NAME=value` / `name: value` without quotes only in config files; answers paste
    # .env lines and YAML, so it reads every line as a config line would be read.
    return tuple(_detect_secrets_plugins()), CONFIG_DENYLIST_REGEX_TO_GROUP


# detect-secrets reports some secrets by a part (GitHub: the "ghp" prefix; a private key: its BEGIN line): the
# finding is widened to the whole token around that part, so a redaction removes all of it.
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-./+=~]*")
_KEY_BLOCK = re.compile(r"-----BEGIN[^\n]*-----[\s\S]*?(?:-----END[^\n]*?-----|\Z)")
_KIND_NAMES = {
    "Secret Keyword": "secret", "Basic Auth Credentials": "password in a URL", "Private Key": "private key",
    "Slack Token": "Slack token", "AWS Access Key": "AWS access key", "GitHub Token": "GitHub token",
    "JSON Web Token": "JSON web token", "Stripe Access Key": "Stripe key",
}


def _not_a_value(secret: str, line: str) -> bool:
    """detect-secrets' own heuristics for values that are not secrets (placeholders, sequences, uuids)."""
    from detect_secrets.filters.heuristic import (
        is_indirect_reference,
        is_potential_uuid,
        is_prefixed_with_dollar_sign,
        is_sequential_string,
        is_templated_secret,
    )

    return (is_sequential_string(secret) or is_potential_uuid(secret) or is_templated_secret(secret)
            or is_prefixed_with_dollar_sign(secret) or is_indirect_reference(line))


def _detect_secrets_findings(text: str) -> list[Finding]:
    plugins, config_regexes = _plugins()
    found = []
    offset = 0  # of the current line in `text`
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        if len(stripped) > 4 and any(c.isascii() and c.isalnum() for c in stripped):
            for kind, plugin in plugins:
                # analyze_string, not analyze_line: analyze_line may call the vendor to verify a secret (network).
                values = (plugin.analyze_string(stripped, denylist_regex_to_group=config_regexes)
                          if kind == "Secret Keyword" else plugin.analyze_string(stripped))
                for value in values:
                    at = stripped.find(value) if value else -1
                    if at < 0 or _not_a_value(value, stripped):
                        continue
                    if kind == "Private Key":
                        block = _KEY_BLOCK.search(text, max(0, offset + at - 16))
                        if block:
                            found.append(Finding("private key", block.start(), block.end(), block.group()))
                            continue
                    start, end = at, at + len(value)
                    if kind != "Basic Auth Credentials":  # a URL's password alone; the rest stays readable
                        while start > 0 and stripped[start - 1] not in "=/" and _TOKEN_CHARS.fullmatch(stripped[start - 1]):
                            start -= 1
                        end = max(end, at + len(_TOKEN_CHARS.match(stripped, at).group()))
                    found.append(Finding(_KIND_NAMES.get(kind, kind), offset + start, offset + end,
                                         stripped[start:end]))
        offset += len(line)
    return found


# --- Secrets detect-secrets has no plugin for, and personal data -----------------------------------------

# Word boundaries are written as (?<![A-Za-z0-9]) rather than \b: `\b` does not match between `_` and a letter, so
# `\bsecret` missed AWS_SECRET_ACCESS_KEY=… (issue 16).
_NOT_ALNUM_BEFORE = r"(?<![A-Za-z0-9])"
_SECRET_PATTERNS: list[tuple[str, re.Pattern, int]] = [
    ("Slack app token", re.compile(_NOT_ALNUM_BEFORE + r"xapp-[A-Za-z0-9-]{8,}"), 0),
    ("API key", re.compile(_NOT_ALNUM_BEFORE + r"sk-(?:proj-|ant-(?:api\d\d-)?)?[A-Za-z0-9_-]{16,}"), 0),
    ("Google API key", re.compile(_NOT_ALNUM_BEFORE + r"AIza[0-9A-Za-z_-]{35}"), 0),
    ("bearer token", re.compile(r"(?i)" + _NOT_ALNUM_BEFORE + r"bearer\s+([A-Za-z0-9._~+/=-]{16,})"), 1),
    ("basic auth credentials", re.compile(
        r"(?i)" + _NOT_ALNUM_BEFORE + r"basic\s+([A-Za-z0-9+/]{8,}={0,2})(?![A-Za-z0-9+/=])"), 1),
    ("Azure connection string key", re.compile(
        r"(?i)(?:AccountKey|SharedAccessKey|SharedAccessSignature|sig)=([A-Za-z0-9+/%]{16,}={0,2})"), 1),
    ("password", re.compile(
        r"(?i)(?:password|passwd|pwd|passphrase|密码|口令)\s*(?:is|was|=|:|：|是|为)\s*[\"'“]?([^\s\"'”,，。;；]{4,})"), 1),
    ("secret", re.compile(
        r"(?i)" + _NOT_ALNUM_BEFORE
        + r"(?:api[_ -]?key|(?:signing[_ -]?|client[_ -]?)?secret(?:[_ -]?(?:access[_ -]?)?key)?"
        r"|access[_ -]?token|auth[_ -]?token|token|密钥|令牌)"
        r"\s*(?:is|=|:|：|是|为)\s*[\"']?([A-Za-z0-9_./+=-]{12,})"), 1),
]

_PERSONAL_PATTERNS: list[tuple[str, re.Pattern, int]] = [
    ("e-mail address", re.compile(
        r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), 0),
    # 18 characters, grouped with single spaces however people write them (6-8-4, 4-4-4-4-2); the birth date and
    # the checksum decide.
    ("Chinese ID number", re.compile(r"(?<![\dA-Za-z])[1-9](?:[ -]?\d){16}[ -]?[\dXx](?![\dA-Za-z])"), 0),
    ("IBAN", re.compile(
        r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?(?![A-Za-z0-9])"), 0),
    ("Chinese mobile number", re.compile(r"(?<![\d+])(?:\+?86[\s-]?)?1[3-9]\d(?:[\s-]?\d{4}){2}(?!\d)"), 0),
    ("phone number", re.compile(
        r"(?<![\w+])\+\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?){2,5}(?!\d)"
        # North American numbers without the +1: area code and exchange never start with 0 or 1.
        r"|(?<![\w(.-])(?:1[\s.-])?\(?[2-9]\d{2}\)?[\s.-]?[2-9]\d{2}[\s.-]\d{4}(?![\d-])"), 0),
    ("card number", re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)"), 0),
]


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _chinese_id_ok(value: str) -> bool:
    chars = re.sub(r"[\s-]", "", value).upper()
    if not re.fullmatch(r"\d{6}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dX]", chars):
        return False
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    total = sum(int(c) * w for c, w in zip(chars[:17], weights))
    return len(chars) == 18 and "10X98765432"[total % 11] == chars[17]


_IBAN_LENGTHS = {"AD": 24, "AT": 20, "BE": 16, "CH": 21, "CZ": 24, "DE": 22, "DK": 18, "ES": 24, "FI": 18, "FR": 27,
                 "GB": 22, "GR": 27, "HU": 28, "IE": 22, "IT": 27, "LU": 20, "NL": 18, "NO": 15, "PL": 28, "PT": 25,
                 "SE": 24, "SK": 24}


def _iban_ok(value: str) -> bool:
    iban = value.replace(" ", "")
    expected = _IBAN_LENGTHS.get(iban[:2])
    if (expected and len(iban) != expected) or not 15 <= len(iban) <= 34:
        return False
    digits = "".join(str(int(c, 36)) for c in iban[4:] + iban[:4])
    return int(digits) % 97 == 1


def _accept(kind: str, value: str) -> bool:
    if kind == "card number":
        digits = re.sub(r"\D", "", value)
        return 13 <= len(digits) <= 19 and _luhn_ok(digits)
    if kind == "phone number":
        return len(re.sub(r"\D", "", value)) >= 8
    if kind == "Chinese ID number":
        return _chinese_id_ok(value)
    if kind == "IBAN":
        return _iban_ok(value)
    return True


def _scan(text: str) -> tuple[Finding, ...]:
    found: list[Finding] = []
    taken: list[tuple[int, int]] = []

    def add(f: Finding) -> None:
        if any(s < f.end and f.start < e for s, e in taken):
            return  # already covered by a finding that came first (the more specific kind)
        taken.append((f.start, f.end))
        found.append(f)

    for f in sorted(_detect_secrets_findings(text), key=lambda f: f.start):
        add(f)
    for kind, pattern, group in _SECRET_PATTERNS + _PERSONAL_PATTERNS:
        for m in pattern.finditer(text):
            value = m.group(group)
            if value and _accept(kind, value):
                start, end = m.span(group)
                add(Finding(kind=kind, start=start, end=end, text=value))
    return tuple(sorted(found, key=lambda f: f.start))


# Training start re-scans the whole approved set, mostly texts scanned before: example-sized texts are cached
# (at most 16,384 of them, so the cache stays tens of MB); whole KB documents are scanned once per import anyway.
_CACHED_UP_TO = 20_000
_scan_cached = lru_cache(maxsize=16384)(_scan)


def find_sensitive(text: str) -> list[Finding]:
    """Every secret or piece of personal data found in `text`, in order, without overlaps."""
    if not text:
        return []
    return list(_scan_cached(text) if len(text) <= _CACHED_UP_TO else _scan(text))


def find_sensitive_in(*texts: str) -> list[Finding]:
    """The findings in several texts (a question, its context and its answer), without repeats."""
    seen: dict[tuple[str, str], Finding] = {}
    for text in texts:
        for f in find_sensitive(text or ""):
            seen.setdefault((f.kind, f.text), f)
    return list(seen.values())


def blocking(findings: list[Finding]) -> list[Finding]:
    """The findings that keep a text out of training data and the KB until someone confirms it."""
    return [f for f in findings if f.blocks]


def redact(text: str) -> str:
    """`text` with each finding replaced by a placeholder that names what was there."""
    out = text
    for f in sorted(find_sensitive(text), key=lambda f: f.start, reverse=True):
        out = out[: f.start] + f"[redacted {f.kind}]" + out[f.end :]
    return out


def describe(findings: list[Finding]) -> str:
    """One line for a curator or a log: what was found, with the values half hidden."""
    return "; ".join(f"{f.kind} ({f.preview})" for f in findings)


def line_of(text: str, offset: int) -> int:
    """The 1-based line of `offset` in `text` (a finding's place in a document, for FILE:LINE)."""
    return text.count("\n", 0, offset) + 1
