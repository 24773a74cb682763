"""Text helpers shared by the store's tables: search segmentation, normalisation, hashing, clocks."""

from __future__ import annotations

import codecs
import datetime as _dt
import hashlib
import re
import unicodedata

# The CJK scripts, defined here once for everything that asks "is this Chinese?" (retrieval, evaluation,
# the engine, verified answers, recommend, document chunking): written without spaces between words.
# Kana, CJK Unified Ideographs Extension A, CJK Unified Ideographs, compatibility ideographs, hangul, and
# Extensions B-F with the compatibility supplement (rare names and classical text).
CJK_RANGES = (r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
              r"\U00020000-\U0002fa1f")
# CJK punctuation: the CJK symbols and punctuation block (、。「」…) and the full-width forms of ASCII
# punctuation (，！？：；（）). Not letters: a run of CJK_RANGES stops at them.
CJK_PUNCTUATION = r"\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
CJK_CHAR = re.compile(f"[{CJK_RANGES}]")  # one CJK character
CJK_RUN = re.compile(f"[{CJK_RANGES}]+")  # a run of them: one unspaced stretch of CJK text
CJK_TEXT_END = re.compile(f"[{CJK_RANGES}{CJK_PUNCTUATION}]$")  # text that ends in CJK: joined without a space
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def _in_gb2312(char: str) -> bool:
    """Is the character in GB2312, the common core of GBK (two bytes, both 0xA1-0xFE): nearly every character of
    Chinese text is; a Latin-1 letter followed by ASCII that happens to decode as GBK ("ü" + "r") is not."""
    encoded = char.encode("gb18030")
    return len(encoded) == 2 and encoded[0] >= 0xA1 and encoded[1] >= 0xA1


def decode_text(data: bytes) -> tuple[str, str]:
    """(text, encoding) of a text file: UTF-8 (with or without its BOM); UTF-16 with its BOM (Excel's "Unicode
    text"); or GB18030, the superset of GBK and GB2312 that Excel and Notepad on Chinese Windows save in, when
    the file is not UTF-8 and 90% of its non-ASCII characters are GB2312's (so Latin-1 "Zwei für alle", which
    decodes as GBK, is not taken for it). Otherwise raises the UTF-8 reading's UnicodeDecodeError, whose
    `start` is where it failed. Windows' line ends (\r\n) and old Macs' (\r) come back as \n."""
    text, encoding = _decoded(data)
    return text.replace("\r\n", "\n").replace("\r", "\n"), encoding


def _decoded(data: bytes) -> tuple[str, str]:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16"), "UTF-16"
    try:
        return data.decode("utf-8-sig"), "UTF-8"
    except UnicodeDecodeError as exc:
        utf8_error = exc
    try:
        text = data.decode("gb18030")
    except UnicodeDecodeError:
        raise utf8_error from None
    wide = [c for c in text if ord(c) > 127]
    if sum(map(_in_gb2312, wide)) >= 0.9 * len(wide):
        return text, "GB18030"
    raise utf8_error


def count(n: int, noun: str) -> str:
    """"1 document", "3 documents": a count with its noun (plural by -s), for what users read."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def now() -> str:
    """UTC timestamp, ISO 8601 with microseconds: sorts as text."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def normalize(text: str) -> str:
    """NFKC, lower case, collapsed whitespace: how duplicates are recognised."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(text.split())


def content_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(normalize(p or "") for p in parts).encode()).hexdigest()


# How CJK runs become FTS terms (issue 15): jieba words (search mode: a long word also yields the words inside
# it, 温湿度 -> 温湿, 湿度, 温湿度) plus overlapping character bigrams. Words make a hit on 叉车 count as one
# matching term rather than a chance pair of characters; the bigrams catch what the segmenter cuts
# differently in a short question than in a long passage (bench/retrieval_recall.py measures both).
# Benchmarks may change this before a KB is imported; the store's index is built with the value in force.
CJK_TERMS: tuple[str, ...] = ("words", "bigrams")

_jieba = None


def _jieba_tokenizer():
    """jieba's tokenizer, its dictionary loaded once per process (about a second) on the first CJK text."""
    global _jieba
    if _jieba is None:
        import logging

        import jieba

        jieba.setLogLevel(logging.WARNING)  # it prints "Building prefix dict…" to stderr otherwise
        tokenizer = jieba.Tokenizer()
        tokenizer.initialize()
        _jieba = tokenizer
    return _jieba


def cjk_words(run: str) -> list[str]:
    """jieba's search-mode segmentation of a run of CJK characters."""
    return [w for w in _jieba_tokenizer().cut_for_search(run, HMM=True) if w.strip()]


_to_simplified = None


def fold_script(text: str) -> str:
    """Traditional Chinese characters as simplified, for matching only (search terms, embeddings): an employee in
    Taiwan or Hong Kong asks "叉車證多久需要複審？" of a KB that writes 叉车证. Only matching sees the folded text;
    what is stored, shown and put in the prompt is what was written. Text without CJK comes back as it is."""
    if not CJK_CHAR.search(text):
        return text
    global _to_simplified
    if _to_simplified is None:
        from opencc import OpenCC

        _to_simplified = OpenCC("t2s").convert
    return _to_simplified(text)


def segment(text: str, *, cjk: tuple[str, ...] = ("bigrams",)) -> list[str]:
    """Tokens: words for alphabetic scripts; for CJK runs, jieba `words` and/or overlapping `bigrams`.

    segment("报销流程 VPN") -> ["报销", "销流", "流程", "vpn"];
    segment("报销流程 VPN", cjk=("words",)) -> ["报销", "流程", "vpn"]. A single CJK character stays itself.
    """
    text = fold_script(unicodedata.normalize("NFKC", text).lower())
    terms: list[str] = []
    for token in _WORD.findall(text):
        pos = 0
        for run in CJK_RUN.finditer(token):
            if run.start() > pos:
                terms.append(token[pos : run.start()])
            chars = run.group()
            if len(chars) == 1:
                terms.append(chars)
            else:
                words = cjk_words(chars) if "words" in cjk else []
                terms.extend(words)
                if "bigrams" in cjk:  # those the words did not already give: a term counts once per place
                    terms.extend(b for b in (chars[i : i + 2] for i in range(len(chars) - 1)) if b not in words)
            pos = run.end()
        if pos < len(token):
            terms.append(token[pos:])
    return terms


def search_terms(text: str) -> list[str]:
    """Words for alphabetic scripts, overlapping bigrams for CJK runs (the cheap, dictionary-free split).

    "报销流程 VPN" -> ["报销", "销流", "流程", "vpn"]. A single CJK character stays a unigram.
    """
    return segment(text, cjk=("bigrams",))


def index_terms(text: str) -> list[str]:
    """The terms the knowledge base's full-text index holds and is queried with (CJK_TERMS)."""
    return segment(text, cjk=CJK_TERMS)


def search_text(text: str) -> str:
    return " ".join(index_terms(text))


def fts_query(text: str) -> str | None:
    """An FTS5 MATCH expression: any of the question's index terms (BM25 ranks the overlap)."""
    terms = list(dict.fromkeys(index_terms(text)))
    if not terms:
        return None
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
