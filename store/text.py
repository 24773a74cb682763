"""Text helpers shared by the store's tables: search segmentation, normalisation, hashing, clocks."""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
import unicodedata

# CJK ideographs, kana and hangul: scripts written without spaces between words.
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_CJK_RUN = re.compile(f"[{_CJK}]+")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def now() -> str:
    """UTC timestamp, ISO 8601 with microseconds: sorts as text."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def normalize(text: str) -> str:
    """NFKC, lower case, collapsed whitespace: how duplicates are recognised."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(text.split())


def content_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(normalize(p or "") for p in parts).encode()).hexdigest()


def search_terms(text: str) -> list[str]:
    """Tokens for FTS: words for alphabetic scripts, overlapping bigrams for CJK runs.

    "报销流程 VPN" -> ["报销", "销流", "流程", "vpn"]. A single CJK character stays a unigram.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    terms: list[str] = []
    for token in _WORD.findall(text):
        pos = 0
        for run in _CJK_RUN.finditer(token):
            if run.start() > pos:
                terms.append(token[pos : run.start()])
            chars = run.group()
            if len(chars) == 1:
                terms.append(chars)
            else:
                terms.extend(chars[i : i + 2] for i in range(len(chars) - 1))
            pos = run.end()
        if pos < len(token):
            terms.append(token[pos:])
    return terms


def search_text(text: str) -> str:
    return " ".join(search_terms(text))


def fts_query(text: str) -> str | None:
    """An FTS5 MATCH expression: any of the question's terms (BM25 ranks the overlap)."""
    terms = list(dict.fromkeys(search_terms(text)))
    if not terms:
        return None
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
