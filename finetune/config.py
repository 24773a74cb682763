"""The training configuration: one typed object, and how its unset fields get their values.

A field left at None means "the default for this base and this data". `resolve_config` fills them in:

- a real base (an HF id or a model folder) gets the seed's recipe: QLoRA, r=8, alpha=32, dropout 0.1,
  all linear projections, lr 2e-4, 3 epochs, batch 4 x accumulation 4, warmup 10%;
- the `tiny` base (random weights, built locally) gets TINY_DEFAULTS: it has to *memorise* its training
  answers from scratch, which takes many more, larger steps than adapting a pretrained model;
- `rank="auto"` applies the seed's rank table to the data (finetune.recommend);
- `epochs` given explicitly turns the step floor (`min_steps`) off unless that is given too.

The resolved config (what was actually used) comes back in TrainOutcome.config, with the reasons.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

METHODS = ("qlora", "lora", "full")
# Qwen2 / Llama naming; "all-linear" finds whatever linear layers a model has (except the output head).
ALL_LINEAR = "all-linear"
QWEN_LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Below this many training examples training is refused: the held-out evaluation and the gate mean nothing.
MIN_TRAIN_EXAMPLES = 8

# The seed's recipe, kept for real (pretrained) bases.
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
#                  (checked exactly, finetune.training.reproduced_examples), so a budget that is more than
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
    rank: int | str | None = None  # N, or "auto" (the seed's table applied to the data)
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
    # other methods (finetune.training.choose_checkpointing).
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
    # method and shape match, else from the base), "base", or an adapter version (finetune.continuation).
    start_from: str | None = None

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

    `profile` (finetune.recommend.DataProfile) is only needed for rank="auto"; it is computed by the caller
    from the training examples.
    """
    from finetune.recommend import recommend_for_profile

    defaults = TINY_DEFAULTS if tiny else SEED_DEFAULTS
    source = "tiny-base default" if tiny else "seed default"
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
        notes.append(f"{source}s: " + ", ".join(f"{k}={_fmt(updates[k])}" for k in applied))
    if tiny:
        notes.append("base is `tiny` (random weights): it memorises its training answers, so it trains with many "
                     "epochs and a high learning rate; pass options to override")
    _validate(resolved, n_examples=n_examples)
    return resolved, notes


def _fmt(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _validate(c: TrainConfig, *, n_examples: int) -> None:
    from store import StoreError

    if c.method not in METHODS:
        raise StoreError(f"method must be one of {', '.join(METHODS)}, not {c.method!r}")
    if not isinstance(c.rank, int) or c.rank < 1:
        raise StoreError(f"rank must be a positive number or 'auto', not {c.rank!r}")
    checks = [
        (c.alpha is not None and c.alpha > 0, f"alpha must be positive, not {c.alpha}"),
        (0 <= c.dropout < 1, f"dropout must be in [0, 1), not {c.dropout}"),
        (c.epochs > 0, f"epochs must be positive, not {c.epochs}"),
        (0 < c.learning_rate < 1, f"learning rate must be in (0, 1), not {c.learning_rate}"),
        (c.batch_size >= 1, f"batch size must be at least 1, not {c.batch_size}"),
        (c.grad_accum >= 1, f"gradient accumulation must be at least 1, not {c.grad_accum}"),
        (0 <= c.warmup < 1, f"warmup is a fraction of the steps in [0, 1), not {c.warmup}"),
        (c.max_length >= 64, f"max length must be at least 64 tokens, not {c.max_length}"),
        (c.k_passages >= 0, f"passages per prompt must be 0 or more, not {c.k_passages}"),
        (c.min_steps >= 0, f"minimum steps must be 0 or more, not {c.min_steps}"),
        (0 <= c.stop_reproduced <= 1, f"the reproduced share to stop at is in [0, 1], not {c.stop_reproduced}"),
        (c.gradient_checkpointing in (True, False, "auto", "mlp"),
         f"gradient checkpointing must be true, false, mlp or auto, not {c.gradient_checkpointing!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise StoreError(message)
    if n_examples < MIN_TRAIN_EXAMPLES:
        raise StoreError(
            f"only {n_examples} training example{'s' if n_examples != 1 else ''}; at least {MIN_TRAIN_EXAMPLES} "
            "are needed (approve more in `kbloop review` or import a file with `kbloop data import`)"
        )


def prompt_passages(config: TrainConfig, *, tiny: bool) -> int:
    """Passages per training prompt: the config's, else the base's default. Callers need it before
    resolve_config, to build the training prompts."""
    if config.k_passages is not None:
        return config.k_passages
    return (TINY_DEFAULTS if tiny else SEED_DEFAULTS)["k_passages"]
