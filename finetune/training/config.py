"""The training configuration: one typed object, and how its unset fields get their values.

A field left at None means "the default for this base and this data". `resolve_config` fills them in:

- a real base (an HF id or a model folder) gets the LoRA guide's recipe (SEED_DEFAULTS): QLoRA, r=8, alpha=32, dropout 0.1,
  all linear projections, lr 2e-4, 3 epochs, batch 4 x accumulation 4, warmup 10%;
- the `tiny` base (random weights, built locally) gets TINY_DEFAULTS: it has to *memorise* its training
  answers from scratch, which takes many more, larger steps than adapting a pretrained model;
- `rank="auto"` applies the LoRA guide's rank table to the data (finetune.training.recommend);
- `epochs` given explicitly turns the step floor (`min_steps`) off unless that is given too.

The resolved config (what was actually used) comes back in TrainOutcome.config, with the reasons.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from finetune.training.recommend import recommend_for_profile
from store import ConfigError, StoreError
from store.adapters import VERSION_RE

METHODS = ("qlora", "lora", "full")
OBJECTIVES = ("sft", "kto", "dpo")
# Qwen2 / Llama naming; "all-linear" finds whatever linear layers a model has (except the output head).
ALL_LINEAR = "all-linear"
QWEN_LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Below this many training examples training is refused: the held-out evaluation and the gate mean nothing.
MIN_TRAIN_EXAMPLES = 8

# The LoRA guide's recipe (the project's seed), kept for real (pretrained) bases: "the default recipe".
# k_passages=3: the three best retrieved passages in every training prompt (and so in every prompt the engine
# builds for the adapter, which records it), so that the model learns to answer from what retrieval finds. The cost
# is prompt length: ~730 tokens per example against ~400 with one passage on 200 guide-layout pairs with short
# questions (bench/train_vs_seed.py --shape guide200); `--passages 1` trains faster, with less to ground on.
SEED_DEFAULTS = dict(
    method="qlora", rank=8, alpha=32, dropout=0.1, targets=ALL_LINEAR, epochs=3.0, learning_rate=2e-4,
    batch_size=4, grad_accum=4, warmup=0.1, max_length=1024, gradient_checkpointing="auto", k_passages=3,
    min_steps=0, stop_reproduced=0.0,
)

# The tiny base has random weights: nothing to adapt, everything to memorise (docs/benchmarks.md, "tiny").
# Measured on samples/qa.jsonl (330 pairs, 2 cores): 100% of the answers reproduced after 20 epochs (2.5-4 min).
#   full         - LoRA on random weights does not learn (the frozen random embeddings and tied output head
#                  cap its confidence: answer loss stays near ln(vocab) ~ 8);
#   0 passages   - tiny cannot read; passages would be 85% of every sequence (~700 tokens instead of ~110),
#                  7x the compute for nothing. The engine asks each adapter with its own passage count,
#                  and still shows the retrieved sources;
#   lr 1e-3, cosine, 20 epochs - 3e-3 is too high (loss 3.6 after 15 epochs where 1e-3 reaches 0.13),
#                  1e-2 diverges; at 15 of 20 epochs 94% are reproduced, at 20 all;
#   batch 8      - batch 4 learns no faster per epoch;
#   dropout 0    - dropout fights memorisation;
#   no gradient checkpointing - activations of a 4M model are small; recomputing them only costs time.
#   min 400 steps - 20 epochs of a small set are too few steps: 25 examples got 60 steps (loss 2.2, 0 of 24
#                  reproduced). Small sets train for at least this many optimiser steps instead (more epochs);
#   stop when reproduced - training stops at the first epoch end where every training answer is reproduced
#                  (checked exactly, finetune.training.reproduction.reproduced_examples), so a budget that is more than
#                  enough costs nothing once the answers are learnt.
TINY_DEFAULTS = dict(
    method="full", rank=8, alpha=32, dropout=0.0, targets=ALL_LINEAR, epochs=20.0, learning_rate=1e-3,
    batch_size=8, grad_accum=1, warmup=0.05, max_length=512, gradient_checkpointing=False, k_passages=0,
    min_steps=400, stop_reproduced=1.0,
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that decides a training run. None = the default for the base (see module docstring)."""

    base: str = "Qwen/Qwen2.5-0.5B-Instruct"  # HF id or model folder (resolve `tiny` with models.resolve_base)
    method: str | None = None  # qlora | lora | full
    rank: int | str | None = None  # N, or "auto" (the LoRA guide's table applied to the data)
    alpha: int | None = None
    dropout: float | None = None
    targets: str | tuple[str, ...] | None = None  # "all-linear" or module names
    epochs: float | None = None
    learning_rate: float | None = None
    batch_size: int | None = None  # per device
    grad_accum: int | None = None
    warmup: float | None = None  # fraction of the steps
    max_length: int | None = None  # tokens of prompt + answer; longer prompts are cut from the passages
    # True (whole layers) | "mlp" (feed-forward blocks only) | False | "auto": whole layers when one batch's
    # activations would take more than a quarter of the free memory, else "mlp" for QLoRA and off for the
    # other methods (finetune.training.memory.choose_checkpointing).
    gradient_checkpointing: bool | str | None = None
    seed: int = 42
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    save_steps: int | None = None  # checkpoint every N optimiser steps (None: about 5 per run)
    version: str | None = None  # the adapter version to register (None: the registry picks the next)
    # Retrieved passages per training prompt. The adapter records it and the engine builds its prompts with
    # the same number, so what the model learnt from is what it is asked with.
    k_passages: int | None = None
    # The run's size: `epochs`, but at least `min_steps` optimiser steps (more epochs for small sets).
    min_steps: int | None = None
    # Stop at the first epoch end where at least this share of the training answers is reproduced exactly
    # (greedy decoding); 0 = never stop early, train the whole budget.
    stop_reproduced: float | None = None
    # Where a registered run starts: "active" (None means that: continue from the active adapter when its base,
    # method and shape match, else from the base), "base", or an adapter version (finetune.training.continuation).
    start_from: str | None = None
    # What the run learns from (issue 20): "sft" the approved examples; "kto" the 👍 / 👎 votes (and corrections
    # as desirable answers); "dpo" (correction, replaced answer) pairs. kto and dpo continue from an adapter
    # (finetune.training.preference).
    objective: str = "sft"

    def as_params(self) -> dict:
        """JSON-able form for the registry's metadata."""
        data = asdict(self)
        if isinstance(data["targets"], tuple):
            data["targets"] = list(data["targets"])
        return data


def parse_targets(text: str | None) -> str | tuple[str, ...] | None:
    """`--targets`: "all-linear", or module names separated by commas ("q_proj,v_proj")."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text in (ALL_LINEAR, "all"):
        return ALL_LINEAR
    return tuple(t.strip() for t in text.split(",") if t.strip())


def resolve_config(config: TrainConfig, *, tiny: bool, n_examples: int, profile=None) -> tuple[TrainConfig, list[str]]:
    """Fill the unset fields; returns the resolved config and one line per default that was applied.

    `profile` (finetune.training.recommend.DataProfile) is only needed for rank="auto"; it is computed by the caller
    from the training examples.
    """
    defaults = TINY_DEFAULTS if tiny else SEED_DEFAULTS
    source = "tiny-base defaults" if tiny else "defaults (the LoRA guide's recipe)"
    notes: list[str] = []
    updates: dict = {}
    for f in fields(TrainConfig):
        if f.name in defaults and getattr(config, f.name) is None:
            updates[f.name] = defaults[f.name]
    if config.epochs is not None and config.min_steps is None and updates.get("min_steps"):
        # Epochs asked for explicitly mean what they say: no step floor stretches them.
        updates["min_steps"] = 0
    if config.rank == "auto":
        if profile is None:
            raise ValueError("rank='auto' needs the data profile")
        rec = recommend_for_profile(profile)
        updates["rank"] = rec.rank
        if config.alpha is None:
            updates["alpha"] = rec.alpha
        notes.append(f"rank auto -> r={rec.rank}, alpha={updates.get('alpha', config.alpha)}: {rec.reasons[0]}")
    resolved = replace(config, **updates)
    applied = [k for k in updates if k not in ("rank", "alpha") or config.rank != "auto"]
    if applied:
        notes.append(f"{source}: " + ", ".join(f"{k}={_fmt(updates[k])}" for k in applied))
    if tiny:
        notes.append("base is `tiny` (random weights): it memorises its training answers, so it trains with many "
                     "epochs and a high learning rate; pass options to override")
    _validate(resolved, n_examples=n_examples)
    return resolved, notes


def _fmt(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


# Upper bounds for one run on one machine. Past them a value is a typo or a hostile request (epochs=1e9 would
# queue a job that never ends, max_length=1e8 one that cannot fit in memory): refused when asked for.
MAX_EPOCHS = 1000
MAX_LENGTH = 32768  # tokens: Qwen2.5's context
MAX_BATCH = 4096  # batch size and gradient accumulation each
MAX_PASSAGES = 50
MAX_STEPS = 10_000_000  # min_steps, save_steps
# Words that mean something else where an adapter version is asked for (`--from`, `kbloop ask --adapter`).
RESERVED_VERSIONS = ("active", "base", "tiny")
_INT_FIELDS = ("alpha", "batch_size", "grad_accum", "max_length", "k_passages", "min_steps", "save_steps", "seed")
_NUMBER_FIELDS = ("dropout", "epochs", "learning_rate", "warmup", "stop_reproduced", "weight_decay")
_TEXT_FIELDS = ("base", "method", "version", "start_from", "lr_scheduler")


def check_settings(c: TrainConfig) -> None:
    """The rules for training settings, wherever a run is asked for: `kbloop train`, /kb-retrain, a queued job.
    Fields left at None (the base's defaults, filled in by resolve_config) are not checked. Raises ConfigError
    naming the setting and what it must be."""
    for name in _INT_FIELDS + _NUMBER_FIELDS:
        value = getattr(c, name)
        kinds = (int,) if name in _INT_FIELDS else (int, float)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise ConfigError(f"{name} must be {'a whole number' if kinds == (int,) else 'a number'}, not {value!r}")
    for name in _TEXT_FIELDS:
        value = getattr(c, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name} must be text, not {value!r}")
    if c.method is not None and c.method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, not {c.method!r}")
    if c.objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, not {c.objective!r}")
    # The registry caps the rank of what it registers (finetune.registry.folders.MAX_RANK, vLLM's limit) itself.
    if c.rank is not None and c.rank != "auto" and (isinstance(c.rank, bool) or not isinstance(c.rank, int)
                                                     or c.rank < 1):
        raise ConfigError(f"rank must be a positive whole number or 'auto', not {c.rank!r}")
    checks = [
        ("alpha", lambda v: v > 0, "alpha must be positive"),
        ("dropout", lambda v: 0 <= v < 1, "dropout must be in [0, 1)"),
        ("epochs", lambda v: 0 < v <= MAX_EPOCHS, f"epochs must be positive and at most {MAX_EPOCHS}"),
        ("learning_rate", lambda v: 0 < v < 1, "learning rate must be in (0, 1)"),
        ("batch_size", lambda v: 1 <= v <= MAX_BATCH, f"batch size must be from 1 to {MAX_BATCH}"),
        ("grad_accum", lambda v: 1 <= v <= MAX_BATCH, f"gradient accumulation must be from 1 to {MAX_BATCH}"),
        ("warmup", lambda v: 0 <= v < 1, "warmup is a fraction of the steps in [0, 1)"),
        ("max_length", lambda v: 64 <= v <= MAX_LENGTH, f"max length must be from 64 to {MAX_LENGTH} tokens"),
        ("k_passages", lambda v: 0 <= v <= MAX_PASSAGES, f"passages per prompt must be from 0 to {MAX_PASSAGES}"),
        ("min_steps", lambda v: 0 <= v <= MAX_STEPS, f"minimum steps must be from 0 to {MAX_STEPS}"),
        ("save_steps", lambda v: 1 <= v <= MAX_STEPS, f"save steps must be from 1 to {MAX_STEPS}"),
        ("stop_reproduced", lambda v: 0 <= v <= 1, "the reproduced share to stop at is in [0, 1]"),
        ("weight_decay", lambda v: 0 <= v < 1, "weight decay must be in [0, 1)"),
    ]
    for name, ok, message in checks:
        value = getattr(c, name)
        if value is not None and not ok(value):  # NaN fails every comparison, so it is refused too
            raise ConfigError(f"{message}, not {value}")
    if c.gradient_checkpointing is not None and c.gradient_checkpointing not in (True, False, "auto", "mlp"):
        raise ConfigError(f"gradient checkpointing must be true, false, mlp or auto, not {c.gradient_checkpointing!r}")
    if c.version is not None or c.start_from is not None:
        if c.version is not None and (c.version.lower() in RESERVED_VERSIONS or not VERSION_RE.match(c.version)):
            raise ConfigError(f"version {c.version!r}: use letters, digits, '.', '_' or '-' (at most 64), and not "
                             f"{', '.join(RESERVED_VERSIONS)}")
        if c.start_from is not None and c.start_from not in ("active", "base") and not VERSION_RE.match(c.start_from):
            raise ConfigError(f"from must be `active`, `base` or an adapter version such as v3, not {c.start_from!r}")


def _validate(c: TrainConfig, *, n_examples: int) -> None:
    if c.method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, not {c.method!r}")
    if not isinstance(c.rank, int) or c.rank < 1:
        raise ConfigError(f"rank must be a positive number or 'auto', not {c.rank!r}")
    check_settings(c)
    if n_examples < MIN_TRAIN_EXAMPLES:  # the data, not a setting
        raise StoreError(
            f"only {n_examples} training example{'s' if n_examples != 1 else ''}; at least {MIN_TRAIN_EXAMPLES} "
            "are needed beside the held-out ones (approve more in `kbloop review` or import a file with "
            "`kbloop data import`)"
        )


def prompt_passages(config: TrainConfig, *, tiny: bool) -> int:
    """Passages per training prompt: the config's, else the base's default. Callers need it before
    resolve_config, to build the training prompts."""
    if config.k_passages is not None:
        return config.k_passages
    return (TINY_DEFAULTS if tiny else SEED_DEFAULTS)["k_passages"]
