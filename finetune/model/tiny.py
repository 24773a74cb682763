"""The `tiny` base: an offline Qwen2-architecture model with random weights, built on this machine.

It exists so that tests and the offline demo run with no model download. Its byte-level BPE tokenizer is
trained on the workspace's knowledge-base text, and it carries a real chat template with
`<|im_start|>` / `<|im_end|>`, so it goes through exactly the code paths a Qwen2.5 model does. It
memorises its training answers; it does not understand language.

    from finetune.model.tiny import ensure_tiny_base
    path = ensure_tiny_base(home, texts)   # $KBLOOP_HOME/models/tiny, built once
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.model.prompting import SYSTEM_PROMPT, build_messages
from store.files import publish_dir

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The Qwen2 chat template's shape, minus tool calling: system turn (default prompt if none), then turns.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT.replace("'", "\\'") + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Size of the tiny base. ~4M parameters: trains in seconds on two CPU cores."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    seed: int = 0


def _train_tokenizer(texts: list[str], spec: TinySpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_base(out_dir: Path, texts: Iterable[str], *, spec: TinySpec = TinySpec()) -> Path:
    """Build the model and tokenizer into `out_dir` (which must not exist)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    # The prompt scaffolding is part of every training and answering prompt: teach the tokenizer it too.
    scaffold = build_messages("What is the question?", input="context", passages=())
    corpus = [m["content"] for m in scaffold] + [SYSTEM_PROMPT, "Knowledge base:", "Question:", "Context:"]
    corpus += [t for t in texts if t and t.strip()]
    tokenizer = _train_tokenizer(corpus, spec)

    torch.manual_seed(spec.seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False
    )
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "TINY.md").write_text(
        "kbloop `tiny` base: Qwen2 architecture, random weights, tokenizer trained on this workspace's "
        f"knowledge base. Spec: {asdict(spec)}. It memorises; it does not understand.\n",
        encoding="utf-8",
    )
    return out_dir


def ensure_tiny_base(home: Path, texts: Iterable[str], *, spec: TinySpec = TinySpec()) -> Path:
    """Return $KBLOOP_HOME/models/tiny, building it first if needed (atomically: temp folder + rename)."""
    target = Path(home) / "models" / "tiny"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_tiny_base(tmp / "model", texts, spec=spec)
        try:
            publish_dir(tmp / "model", target)
        except OSError:
            # Another process finished first; its base is as good as ours.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
