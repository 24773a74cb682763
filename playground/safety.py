"""Secrets and personal data in answers and corrections, found before they become training data.

A model trained on an answer that holds an API key or someone's phone number will repeat it to anyone
who asks. Approving a flagged text therefore needs an explicit confirmation or a redaction.
Patterns favour recall on the shapes that matter (vendor key prefixes, e-mail, phone numbers including
Chinese mobiles, Chinese ID numbers, card numbers that pass the Luhn check); a generic word like
"password" alone is not flagged, only "password: <value>".
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    kind: str  # e.g. "Slack token", "e-mail address"
    start: int
    end: int
    text: str

    @property
    def preview(self) -> str:
        """The match with its middle hidden, so the warning itself does not spread the secret."""
        t = self.text
        return t if len(t) <= 6 else f"{t[:4]}…{t[-2:]}"


# (kind, pattern, group holding the sensitive value: 0 = whole match)
_PATTERNS: list[tuple[str, re.Pattern, int]] = [
    ("private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"), 0),
    ("Slack token", re.compile(r"\bxox[abposre]-[A-Za-z0-9-]{8,}"), 0),
    ("Slack app token", re.compile(r"\bxapp-[A-Za-z0-9-]{8,}"), 0),
    ("API key", re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{16,}"), 0),
    ("AWS access key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), 0),
    ("GitHub token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"), 0),
    ("Google API key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}"), 0),
    ("JSON web token", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), 0),
    ("bearer token", re.compile(r"(?i)\bbearer\s+([A-Za-z0-9._~+/=-]{16,})"), 1),
    ("password", re.compile(
        r"(?i)(?:password|passwd|pwd|passphrase|密码|口令)\s*(?:is|was|=|:|：|是|为)\s*[\"'“]?([^\s\"'”,，。;；]{4,})"), 1),
    ("secret", re.compile(
        r"(?i)\b(?:api[_ -]?key|secret(?:[_ -]?key)?|access[_ -]?token|auth[_ -]?token|client[_ -]?secret|token)"
        r"\s*(?:is|=|:|：)\s*[\"']?([A-Za-z0-9_./+=-]{12,})"), 1),
    ("e-mail address", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), 0),
    ("Chinese ID number", re.compile(r"(?<!\d)[1-9]\d{5}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?!\d)"), 0),
    ("Chinese mobile number", re.compile(r"(?<![\d+])(?:\+?86[\s-]?)?1[3-9]\d(?:[\s-]?\d{4}){2}(?!\d)"), 0),
    ("phone number", re.compile(r"(?<![\w+])\+\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?){2,5}(?!\d)|\(\d{3}\)\s?\d{3}[\s.-]\d{4}(?!\d)"), 0),
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


def find_sensitive(text: str) -> list[Finding]:
    """Every secret or piece of personal data found in `text`, in order, without overlaps."""
    if not text:
        return []
    found: list[Finding] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern, group in _PATTERNS:
        for m in pattern.finditer(text):
            start, end = m.span(group)
            value = m.group(group)
            if kind == "card number":
                digits = re.sub(r"\D", "", value)
                if not (13 <= len(digits) <= 19 and _luhn_ok(digits)):
                    continue
            if kind == "phone number" and len(re.sub(r"\D", "", value)) < 8:
                continue
            if any(s < end and start < e for s, e in taken):
                continue  # already covered by a more specific pattern
            taken.append((start, end))
            found.append(Finding(kind=kind, start=start, end=end, text=value))
    return sorted(found, key=lambda f: f.start)


def redact(text: str) -> str:
    """`text` with each finding replaced by a placeholder that names what was there."""
    out = text
    for f in sorted(find_sensitive(text), key=lambda f: f.start, reverse=True):
        out = out[: f.start] + f"[redacted {f.kind}]" + out[f.end :]
    return out


def describe(findings: list[Finding]) -> str:
    """One line for the curator: what was found, with the values half hidden."""
    return "; ".join(f"{f.kind} ({f.preview})" for f in findings)
