"""The LoRA guide's decision framework (LoRA or full fine-tuning, which rank) applied to the actual data.

The guide's table, by number of training examples:

    under 1k        LoRA r=8
    1k - 10k        LoRA r=8-16
    10k - 100k      LoRA r=16-32
    above 100k      full fine-tuning, or LoRA r=32-64 by task complexity

Within a band the upper rank is chosen when the task is complex: long answers (the model has more to
say per question), several languages (more to represent), or many examples with extra input context.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from store.text import CJK_CHAR

_CYRILLIC = re.compile(r"[\u0400-\u04ff]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")

LONG_ANSWER_WORDS = 60  # mean answer length above which a task counts as complex


@dataclass(frozen=True)
class DataProfile:
    n_examples: int
    mean_answer_words: float
    max_answer_words: int
    languages: dict[str, int]  # language family -> examples
    with_input: int  # examples with an extra `input` field

    @property
    def multilingual(self) -> bool:
        significant = [n for n in self.languages.values() if n >= max(2, 0.05 * self.n_examples)]
        return len(significant) > 1

    @property
    def complex(self) -> bool:
        return self.mean_answer_words > LONG_ANSWER_WORDS or self.multilingual or (
            self.n_examples and self.with_input / self.n_examples > 0.5)


@dataclass(frozen=True)
class Recommendation:
    method: str  # "lora" (QLoRA on a GPU-poor machine) or "full"
    rank: int
    alpha: int
    rank_range: tuple[int, int]
    reasons: list[str] = field(default_factory=list)
    profile: DataProfile | None = None

    def text(self) -> str:
        lines = [f"Recommendation: {'full fine-tuning' if self.method == 'full' else 'LoRA / QLoRA'}, "
                 f"rank {self.rank} (alpha {self.alpha}; band {self.rank_range[0]}-{self.rank_range[1]})"]
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


def _words(text: str) -> int:
    # CJK text has no spaces: count each CJK character as a word, like tokenizers roughly do.
    return len(CJK_CHAR.findall(text)) + len(CJK_CHAR.sub(" ", text).split())


def language_of(text: str) -> str:
    cjk, cyr, lat = len(CJK_CHAR.findall(text)), len(_CYRILLIC.findall(text)), len(_LATIN.findall(text))
    if cjk and cjk >= 0.2 * (cjk + lat + cyr):
        return "zh/ja/ko"
    if cyr > lat:
        return "cyrillic"
    return "latin" if lat else "other"


def profile_examples(examples: Sequence) -> DataProfile:
    """Size and task mix of examples with .question / .input / .answer (store or training examples)."""
    lengths = [_words(e.answer) for e in examples]
    langs = Counter(language_of(e.question + " " + e.answer) for e in examples)
    return DataProfile(
        n_examples=len(examples),
        mean_answer_words=(sum(lengths) / len(lengths)) if lengths else 0.0,
        max_answer_words=max(lengths, default=0),
        languages=dict(langs.most_common()),
        with_input=sum(1 for e in examples if (e.input or "").strip()),
    )


def recommend_for_profile(p: DataProfile) -> Recommendation:
    n = p.n_examples
    complexity = []
    if p.mean_answer_words > LONG_ANSWER_WORDS:
        complexity.append(f"long answers (mean {p.mean_answer_words:.0f} words > {LONG_ANSWER_WORDS})")
    if p.multilingual:
        complexity.append("several languages (" + ", ".join(f"{k}: {v}" for k, v in p.languages.items()) + ")")
    if n and p.with_input / n > 0.5:
        complexity.append(f"most examples carry extra input context ({p.with_input}/{n})")
    simple_reason = f"simple task: short answers ({p.mean_answer_words:.0f} words on average), one language"
    why_band = "complex task: " + "; ".join(complexity) if complexity else simple_reason

    if n < 1_000:
        method, band, rank = "lora", (8, 8), 8
        reasons = [f"{n} examples (< 1k): the LoRA guide's table says LoRA r=8; more rank would only overfit"]
        if complexity:
            reasons.append(f"noted {why_band}, but with this little data r=8 stays the choice")
    elif n < 10_000:
        method, band = "lora", (8, 16)
        rank = 16 if complexity else 8
        reasons = [f"{n} examples (1k-10k): the LoRA guide's band is r=8-16", f"r={rank}: {why_band}"]
    elif n < 100_000:
        method, band = "lora", (16, 32)
        rank = 32 if complexity else 16
        reasons = [f"{n} examples (10k-100k): the LoRA guide's band is r=16-32", f"r={rank}: {why_band}"]
    else:
        band = (32, 64)
        rank = 64 if complexity else 32
        method = "full" if complexity else "lora"
        reasons = [f"{n} examples (> 100k): the LoRA guide recommends full fine-tuning, or LoRA r=32-64 by complexity"]
        reasons.append(f"{'full fine-tuning (or r=64 where memory is short)' if method == 'full' else f'LoRA r={rank}'}: "
                       f"{why_band}")
    langs = ", ".join(f"{k} {v}" for k, v in p.languages.items()) or "none"
    reasons.append(f"data: {n} examples, answers {p.mean_answer_words:.0f} words on average (max "
                   f"{p.max_answer_words}), languages: {langs}, with input: {p.with_input}")
    # alpha / r = 4 as in the guide's recipe (r=8, alpha=32): the update's scale stays the same across ranks.
    return Recommendation(method=method, rank=rank, alpha=4 * rank, rank_range=band, reasons=reasons, profile=p)


def recommend(examples: Sequence) -> Recommendation:
    return recommend_for_profile(profile_examples(examples))
