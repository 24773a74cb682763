"""kbloop's SFT vs the seed's recipe: same base, same data, same epochs, rank and batch; one run each.

    .venv/bin/python bench/train_vs_seed.py [--pairs 1000] [--epochs 2] [--out bench/out/train_vs_seed.json]

The seed's recipe, with only its crashes fixed (so it runs at all):
- HF Trainer + DataCollatorForLanguageModeling(mlm=False), pad = eos, labels = the whole input;
- a hard-coded ChatML template string instead of the tokenizer's;
- padding="max_length" in its tokenize function (fixed: it iterated over column names);
- QLoRA through `load_in_4bit` (fixed: passed as BitsAndBytesConfig(load_in_4bit=True), no NF4 / double
  quantisation, as the seed had none) and prepare_model_for_kbit_training (gradient checkpointing on);
- fp16=True (fixed: off, there is no fp16 on a CPU).
kbloop: finetune.training.trainer.train_adapter with the seed's hyperparameters (QLoRA r=8, alpha 32, dropout
0.1, all linear projections, batch 4 x 4, warmup 10%, cosine) and kbloop's own default for gradient
checkpointing ("auto": for QLoRA the feed-forward blocks, whole layers only when memory is short) on the
same pairs.

Base: a Qwen2-architecture model of ~10M parameters built locally (finetune.model.tiny), pretrained for
--pretrain-steps next-token steps on the sample KB and the general text (LoRA cannot adapt random weights).
A small base learns little at the seed's lr 2e-4, so both runs use --lr (default 2e-3).
Data: 1,000 QA pairs of varied length, made from samples/qa.jsonl by joining 1-4 pairs into one question
and one answer. Each recipe trains in its own process (peak RSS measured per process). Held-out: 10% of
the pairs by question hash (finetune.training.data.split_heldout). Metrics, each recipe with its own prompt format:
answer-token loss on the held-out split (answer tokens only, end token excluded), stop rate (greedy
generation ends with <|im_end|> within 2x the reference length + 16 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEED_SYSTEM = "You are a helpful assistant."


def seed_prompt(question: str) -> str:
    # The seed's hard-coded template (ChatML written out by hand).
    return f"<|im_start|>system\n{SEED_SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in (REPO / "samples" / "qa.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    pairs, seen = [], set()
    while len(pairs) < n:
        k = rng.choice([1, 1, 2, 3, 4])  # varied length: many single answers, some long combined ones
        picked = rng.sample(rows, k)
        q = " Also: ".join(r["instruction"] for r in picked)
        if q in seen:
            continue
        seen.add(q)
        pairs.append({"question": q, "answer": " ".join(r["output"] for r in picked)})
    return pairs


def build_base(home: Path, *, pretrain_steps: int) -> str:
    """A ~10M-parameter Qwen2 model, briefly pretrained (next-token, full parameters) on the sample KB and
    the general text, so that it is a small language model to adapt rather than noise (LoRA cannot adapt
    random weights: docs/training.md). Neither recipe's prompt format is in its pretraining data."""
    import torch

    from finetune.model.tiny import TinySpec, build_tiny_base

    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "samples" / "kb").rglob("*")) if p.is_file()]
    texts.append((REPO / "finetune" / "assets" / "general.txt").read_text(encoding="utf-8"))
    spec = TinySpec(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=6, num_key_value_heads=2)
    path = build_tiny_base(home / "base10m", texts, spec=spec)
    if not pretrain_steps:
        return str(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = [i for t in texts for i in tok(t + "\n\n", add_special_tokens=False)["input_ids"]]
    block, batch = 256, 8
    blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)  # (N, block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    model.train()
    started = time.monotonic()
    for step in range(pretrain_steps):
        rows = blocks[torch.randint(len(blocks), (batch,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == pretrain_steps - 1:
            print(f"pretraining the base: step {step + 1}/{pretrain_steps}, loss {loss.item():.2f}, "
                  f"{time.monotonic() - started:.0f} s", flush=True)
    model.save_pretrained(path)
    return str(path)


# --- The two recipes (each runs in a child process) -----------------------------------------------------


def train_seed(base: str, train: list[dict], out: Path, a) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.eos_token  # the seed: pad = eos (<|im_end|>)
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=32, lora_dropout=0.1, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))

    def tokenize_function(batch):  # fixed: iterate over rows, not column names
        texts = [seed_prompt(q) + ans + "<|im_end|>" for q, ans in zip(batch["question"], batch["answer"])]
        return tokenizer(texts, truncation=True, max_length=a.seed_max_length, padding="max_length")

    ds = Dataset.from_list(train).map(tokenize_function, batched=True, remove_columns=["question", "answer"])
    args = TrainingArguments(output_dir=str(out / "ckpt"), num_train_epochs=a.epochs, per_device_train_batch_size=4,
                             gradient_accumulation_steps=4, learning_rate=a.lr, warmup_steps=0.1,
                             logging_steps=10, save_strategy="no", report_to="none", fp16=False, use_cpu=True,
                             disable_tqdm=True, seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    t = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - t
    model.save_pretrained(out / "adapter")
    return {"train_seconds": seconds, "steps": trainer.state.global_step}


def train_kbloop(base: str, train: list[dict], out: Path, a) -> dict:
    from finetune.training.config import TrainConfig
    from finetune.training.data import TrainingExample
    from finetune.training.trainer import train_adapter

    examples = [TrainingExample(question=p["question"], input="", answer=p["answer"], passages=[]) for p in train]
    config = TrainConfig(base=base, method="qlora", rank=a.rank, alpha=32, dropout=0.1, targets="all-linear",
                         epochs=float(a.epochs), learning_rate=a.lr, batch_size=4, grad_accum=4, warmup=0.1,
                         max_length=a.seed_max_length, gradient_checkpointing="auto", k_passages=0)
    t = time.monotonic()
    outcome = train_adapter(config, examples, out / "adapter")
    return {"train_seconds": time.monotonic() - t, "steps": outcome.steps}


# --- Evaluation (the parent process) ------------------------------------------------------------------


def evaluate(base: str, adapter: Path, heldout: list[dict], prompt_of, max_eval: int) -> dict:
    import torch

    from finetune.model.loading import load_model_for_inference

    model, tok = load_model_for_inference(base, adapter_path=adapter)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    nll, count, stopped = 0.0, 0, 0
    tok.padding_side = "left"
    for p in heldout:
        prompt_ids = tok(prompt_of(tok, p["question"]), add_special_tokens=False)["input_ids"]
        answer_ids = tok(p["answer"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()  # predicts the answer
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(answer_ids), reduction="sum").item()
        count += len(answer_ids)
    for p in heldout[:max_eval]:
        prompt_ids = tok(prompt_of(tok, p["question"]), add_special_tokens=False, return_tensors="pt")
        budget = 2 * len(tok(p["answer"], add_special_tokens=False)["input_ids"]) + 16
        with torch.no_grad():
            gen = model.generate(**prompt_ids, max_new_tokens=budget, eos_token_id=[eot], do_sample=False)
        stopped += eot in gen[0, prompt_ids["input_ids"].shape[1]:].tolist()
    return {"heldout_answer_loss": nll / count, "stop_rate": stopped / min(len(heldout), max_eval),
            "n_heldout": len(heldout), "n_generated": min(len(heldout), max_eval)}


def kbloop_prompt(tok, question):
    from finetune.model.prompting import build_messages, render_prompt

    return render_prompt(tok, build_messages(question))


def peak_rss_mb() -> float:
    """This process's own peak resident memory. Not getrusage's ru_maxrss: Linux carries that across
    fork + exec, so a child started by this (larger) parent would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def child(a) -> None:
    work = Path(a.work)
    base = (work / "base.txt").read_text()
    train = json.loads((work / "train.json").read_text())
    fn = train_seed if a.child == "seed" else train_kbloop
    result = fn(base, train, work / a.child, a)
    result["peak_rss_mb"] = peak_rss_mb()
    (work / f"{a.child}.json").write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed-max-length", type=int, default=256, help="the seed pads every example to this")
    p.add_argument("--pretrain-steps", type=int, default=300, help="next-token steps on the KB text for the base")
    p.add_argument("--max-eval", type=int, default=100, help="held-out examples generated for the stop rate")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "train_vs_seed.json"))
    p.add_argument("--child", choices=["seed", "kbloop"])
    p.add_argument("--work")
    a = p.parse_args()
    if a.child:
        child(a)
        return
    from finetune.training.data import split_heldout

    work = Path(tempfile.mkdtemp(prefix="train-vs-seed-"))
    base = build_base(work, pretrain_steps=a.pretrain_steps)
    (work / "base.txt").write_text(base)
    pairs = make_pairs(a.pairs)

    class Q:  # split_heldout reads .question
        def __init__(self, d):
            self.question, self.d = d["question"], d

    train, heldout = split_heldout([Q(d) for d in pairs])
    train, heldout = [q.d for q in train], [q.d for q in heldout]
    (work / "train.json").write_text(json.dumps(train))
    results = {"pairs": a.pairs, "train": len(train), "heldout": len(heldout), "epochs": a.epochs, "rank": a.rank,
               "pretrain_steps": a.pretrain_steps,
               "lr": a.lr, "seed_max_length": a.seed_max_length, "cpu": os.cpu_count(),
               "load_avg_start": os.getloadavg()[0]}
    from finetune.model.loading import load_base_model

    results["base_params"] = sum(p.numel() for p in load_base_model(base).parameters())
    for name in ("seed", "kbloop"):
        print(f"training: {name}", flush=True)
        cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--epochs", str(a.epochs),
               "--rank", str(a.rank), "--lr", str(a.lr), "--seed-max-length", str(a.seed_max_length)]
        subprocess.run(cmd, check=True)
        results[name] = json.loads((work / f"{name}.json").read_text())
    seed_prompt_of = lambda tok, q: seed_prompt(q)  # noqa: E731
    results["seed"].update(evaluate(base, work / "seed" / "adapter", heldout, seed_prompt_of, a.max_eval))
    results["kbloop"].update(evaluate(base, work / "kbloop" / "adapter", heldout, kbloop_prompt, a.max_eval))
    results["load_avg_end"] = os.getloadavg()[0]
    s, k = results["seed"], results["kbloop"]
    results["time_ratio"] = k["train_seconds"] / s["train_seconds"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"\nwall time kbloop/seed: {results['time_ratio']:.2f} (target <= 0.5); held-out answer loss "
          f"{k['heldout_answer_loss']:.3f} vs {s['heldout_answer_loss']:.3f}; stop rate {k['stop_rate']:.0%} vs "
          f"{s['stop_rate']:.0%}; peak RSS {k['peak_rss_mb']:.0f} vs {s['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
