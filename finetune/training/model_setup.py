"""The model a run trains: the base loaded for the method, LoRA wrapped around it, gradient checkpointing set up.

LoRA and QLoRA adapt all linear projections by default (q,k,v,o,gate,up,down; never the output head, so the
adapter carries no `modules_to_save`); full fine-tuning trains every weight. Checkpointing is non-reentrant,
with input grads enabled, so that it works with PEFT's frozen-input LoRA layers.
"""

from __future__ import annotations

from pathlib import Path

from finetune.model import loading
from finetune.training.config import ALL_LINEAR, TrainConfig
from finetune.training.fused import fuse_lora_dropout
from finetune.training.memory import checkpoint_feed_forward
from store import StoreError


def prepare_model(config: TrainConfig, *, init_from: Path | None = None):
    """Load the base for the method, wrap it in LoRA where asked, and set up gradient checkpointing.

    `init_from`: full fine-tuning loads that model folder instead of the base; LoRA / QLoRA load that adapter,
    trainable, with its own rank, alpha and targets."""
    quantize = config.method == "qlora"
    full_from = init_from is not None and config.method == "full"
    model = loading.load_base_model(str(init_from) if full_from else config.base, quantize=quantize)
    model.config.use_cache = False  # the KV cache is for generation; with checkpointing it only wastes memory
    gc_kwargs = {"use_reentrant": False}  # reentrant checkpointing loses gradients of frozen-input LoRA layers
    whole_layers = config.gradient_checkpointing is True
    if quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=whole_layers, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif whole_layers:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
    if config.gradient_checkpointing == "mlp":
        checkpoint_feed_forward(model)
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad = True
        return model

    if init_from is not None:
        from peft import PeftModel

        if whole_layers and not quantize:
            model.enable_input_require_grads()
        model = PeftModel.from_pretrained(model, str(init_from), is_trainable=True)
        fuse_lora_dropout(model)
        return model

    from peft import LoraConfig, get_peft_model

    targets = _target_modules(model, config.targets)
    smallest = min(features for _, features in targets.values())
    if config.rank > smallest:
        raise StoreError(
            f"rank {config.rank} is larger than the smallest targeted layer of {config.base} ({smallest} features); "
            f"choose a rank of at most {smallest}"
        )
    if whole_layers and not quantize:
        # Frozen embeddings produce inputs without grad; checkpointed blocks then need this to backprop.
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=sorted(targets),
        bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    fuse_lora_dropout(model)  # same dropout, without PEFT's extra copies and slow CPU masks
    return model


def _target_modules(model, targets) -> dict[str, tuple[str, int]]:
    """Leaf names of the linear layers to adapt -> (an example module, min(in, out) features)."""
    import torch

    linear_types = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except Exception:  # bitsandbytes absent or without a backend: plain linear layers only
        pass
    output_head = model.get_output_embeddings()
    found: dict[str, tuple[str, int]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, linear_types) or module is output_head:
            continue
        leaf = name.rsplit(".", 1)[-1]
        size = min(module.in_features, module.out_features)
        if leaf in found:
            size = min(size, found[leaf][1])
        found[leaf] = (name, size)
    if targets in (None, ALL_LINEAR):
        if not found:
            raise StoreError(f"{model.config._name_or_path}: no linear layers to adapt")
        return found
    missing = [t for t in targets if t not in found]
    if missing:
        raise StoreError(
            f"target module(s) {', '.join(missing)} not in the model; it has: {', '.join(sorted(found))}"
        )
    return {t: found[t] for t in targets}
