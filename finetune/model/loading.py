"""Base models: resolving a name to something loadable, and loading for training or inference."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from store import StoreError

TINY = "tiny"


def _fallback_texts() -> Iterable[str]:
    """Text for the tiny tokenizer when the knowledge base is still empty: the shipped general text."""
    general = Path(__file__).resolve().parents[1] / "assets" / "general.txt"
    if general.exists():
        yield general.read_text(encoding="utf-8")


def resolve_base(name: str, *, home: Path, db=None) -> str:
    """`tiny` -> the locally built tiny base (built on first use); a local folder -> its path; else the HF id."""
    if name == TINY:
        from finetune.model.tiny import ensure_tiny_base

        texts: list[str] = []
        if db is not None:
            from store.kb import all_kb_text

            texts = list(all_kb_text(db))
        return str(ensure_tiny_base(home, texts or list(_fallback_texts())))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise StoreError(f"{path}: not a model folder (no config.json)")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise StoreError(
            f"base model {name!r} not found: expected `tiny`, a local model folder, or a Hugging Face id like "
            "Qwen/Qwen2.5-0.5B-Instruct"
        )
    return name


# --- Loading (training and inference) ------------------------------------------------------------------
# The same tokenizer, dtype and end-of-turn handling serve training and answering.


def is_tiny_base(path: str | Path) -> bool:
    """True for a folder built by finetune.model.tiny (random weights: training uses TINY_DEFAULTS)."""
    return (Path(path) / "TINY.md").exists()


def names_tiny(base: str) -> bool:
    """Whether a base as configured (`tiny`, a folder, a hub id) trains with TINY_DEFAULTS, without building
    `tiny` to find out (resolve_base builds it)."""
    return base == TINY or is_tiny_base(base)


def compute_dtype():
    """bf16 where the hardware has it (CUDA with bf16), else fp16 on older GPUs, fp32 on the CPU (never fp16)."""
    import torch

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _load_error(base: str, exc: Exception) -> StoreError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = ("" if Path(base).exists() else "; a machine without the model hub needs KBLOOP_BASE_MODEL set to a "
            "folder holding the model (downloaded elsewhere), or to `tiny`, the offline demo base")
    return StoreError(f"base model {base!r} could not be loaded: {first[:300]}{hint}")


def load_tokenizer(base: str):
    """The base's tokenizer; refuses one without a chat template (training and answering both need it)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except Exception as exc:  # OSError for missing repos/folders, ValueError for odd configs
        raise _load_error(base, exc) from None
    if not getattr(tokenizer, "chat_template", None):
        raise StoreError(
            f"base model {base!r} has no chat template: use an instruction-tuned model "
            "(e.g. Qwen/Qwen2.5-0.5B-Instruct) or `tiny`"
        )
    if tokenizer.pad_token_id is None:
        # Padding is masked by position (attention mask and labels), never by id, so any token will do;
        # the end-of-turn token stays a real, trained token wherever it occurs.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with (<|im_end|> for Qwen), found by rendering one."""
    marker = "\u2063kbloop-answer\u2063"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    suffix = text.split(marker, 1)[1] if marker in text else ""
    special = set(tokenizer.all_special_ids)
    for token_id in tokenizer(suffix, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return token_id
    if tokenizer.eos_token_id is None:
        raise StoreError("the tokenizer's chat template ends a turn with no special token and it has no EOS token")
    return tokenizer.eos_token_id


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops at the end-of-turn token (and at EOS where that differs). What a loaded model's
    generation config is given; `serving_stop_ids` is the whole set generation stops at."""
    ids = [end_of_turn_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def serving_stop_ids(model, tokenizer) -> list[int]:
    """Every token at which generation stops: the set the engine serves with and the one the gate's stop
    rate measures against (finetune.evaluation.metrics), so that "stops" means the same in both.

    The end-of-turn token and EOS (`stop_token_ids`), the model's configured EOS ids, and `<|im_end|>` and
    the EOS token wherever the vocabulary has them; in that order, without repeats. `model` may also be its
    GenerationConfig alone (the engine on vLLM loads no weights), or None."""
    ids = list(stop_token_ids(tokenizer))
    configured = getattr(getattr(model, "generation_config", model), "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif configured:
        ids += list(configured)
    for token in ("<|im_end|>", tokenizer.eos_token):
        tid = tokenizer.convert_tokens_to_ids(token) if token else None
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.append(tid)
    return list(dict.fromkeys(ids))


def quantization_config():
    """QLoRA's 4-bit setting: NF4, double quantisation, bf16 compute (bitsandbytes runs it on CUDA and CPU).

    GPUs without bf16 (before Ampere) compute in fp16 instead.
    """
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        compute = torch.float16

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def load_base_model(base: str, *, quantize: bool = False, device_map=None):
    """The causal LM, in the hardware's dtype, optionally 4-bit (QLoRA)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": compute_dtype()}
    if quantize:
        kwargs["quantization_config"] = quantization_config()
        kwargs["device_map"] = device_map or {"": _local_device()}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except Exception as exc:
        raise _load_error(base, exc) from None


def _local_device():
    import os

    import torch

    if torch.cuda.is_available():
        return int(os.environ.get("LOCAL_RANK", "0"))
    return "cpu"


def load_model_for_inference(base_path_or_id: str, *, adapter_path: str | Path | None = None):
    """(model, tokenizer) ready for greedy generation: eval mode, stop at the end-of-turn token.

    `adapter_path` may be a PEFT adapter folder or a full model folder (method "full"); the tokenizer is taken
    from it when it has one, so that training and answering see the same one.
    """
    import torch

    tok_source = str(adapter_path) if adapter_path and (Path(adapter_path) / "tokenizer_config.json").exists() \
        else base_path_or_id
    tokenizer = load_tokenizer(tok_source)
    if adapter_path is not None and not (Path(adapter_path) / "adapter_config.json").exists():
        if not (Path(adapter_path) / "config.json").exists():
            raise StoreError(f"{adapter_path}: neither a PEFT adapter (adapter_config.json) nor a model folder")
        model = load_base_model(str(adapter_path))  # a fully fine-tuned model
    else:
        model = load_base_model(base_path_or_id)
        if adapter_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=False)
    if torch.cuda.is_available() and not hasattr(model, "hf_device_map"):
        model = model.to("cuda")
    model.eval()
    stops = stop_token_ids(tokenizer)
    gen = model.generation_config
    gen.eos_token_id = stops
    gen.pad_token_id = tokenizer.pad_token_id
    gen.do_sample = False
    for name in ("temperature", "top_p", "top_k"):
        setattr(gen, name, None)
    return model, tokenizer
