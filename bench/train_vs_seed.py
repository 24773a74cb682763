"""kbloop's SFT vs the LoRA guide's (the seed's) recipe: same base, same data, epochs, rank, batch and schedule.

    .venv/bin/python bench/train_vs_seed.py --shape all --runs 3        # both shapes, 3 timed runs each
    .venv/bin/python bench/train_vs_seed.py --shape guide200 --runs 3 --base-dir DIR   # reuse a pretrained base

Output: bench/out/train_vs_seed_<shape>.json per shape (every run's times and load, the median and spread, the
evaluation, model FLOPs utilisation).

Two data shapes, both generated deterministically from what the project ships (samples/qa.jsonl, samples/kb):
- `varied1000`: 1,000 QA pairs of varied length, each question and answer joined from 1-4 sample pairs.
  kbloop trains them without retrieved passages (`k_passages=0`), as they were measured before.
- `guide200`: 200 pairs in the LoRA guide's layout (one fixed instruction on every row, the employee's question in
  `input`): short questions, answers of 1 to 12 sentences (a sample answer continued with sentences of the KB
  document it is about). kbloop reads the file with its own import (store.formats) and trains it the product's
  way: the training prompts carry what `kbloop train` gives them (retrieved passages, approved answers to related
  questions, per the real-base defaults), from a workspace with samples/kb imported and the training pairs
  approved (retrieval runs once, before the timed runs).

Held-out: the QA rows of samples/qa.jsonl are split first (10% by hash of the answer, so paraphrased questions
with the same answer stay on one side); training pairs are built from the training rows only and held-out pairs
from the held-out rows only, so no held-out question was ever trained.

The seed's recipe, with only its crashes fixed (so it runs at all):
- HF Trainer + DataCollatorForLanguageModeling(mlm=False), pad = eos, labels = the whole input;
- a hard-coded ChatML template string instead of the tokenizer's (guide200: instruction, then input);
- padding="max_length" in its tokenize function (fixed: it iterated over column names);
- QLoRA through `load_in_4bit` (fixed: passed as BitsAndBytesConfig(load_in_4bit=True), no NF4 / double
  quantisation, as the seed had none) and prepare_model_for_kbit_training (gradient checkpointing on);
- fp16=True (fixed: off, there is no fp16 on a CPU).
Both recipes: QLoRA r=8, alpha 32, dropout 0.1, all linear projections, batch 4 x 4, warmup 10%, and the same
schedule (`--lr-scheduler`, cosine by default: kbloop's; the seed's Trainer would default to linear). kbloop
uses its own defaults for everything else (gradient checkpointing "auto", length-grouped batches, ...).

Base: a Qwen2-architecture model of ~10M parameters built locally (finetune.model.tiny), pretrained for
--pretrain-steps next-token steps on the sample KB and the general text (LoRA cannot adapt random weights),
then treated as a real base (its `tiny` marker removed). A small base learns little at the seed's lr 2e-4, so
both runs use --lr (default 2e-3).

Timing (wall, and the process's CPU time, which varies less with other jobs' load): each recipe trains in its own process, the two back to back within each run (so they share the
machine's load), --runs times. The training time runs from loading the base to the adapter saved, the libraries
already imported, for both recipes alike (the seed: tokenizer, 4-bit model, PEFT wrapping, tokenised dataset,
Trainer.train, save; kbloop: train_adapter, which loads, encodes, trains and saves); the loop alone
(Trainer.train, inside train_adapter for kbloop) is kept beside it as `loop_seconds`. Every run
is seeded the same, so the weights do not depend on the run: the first run's adapters are evaluated. Metrics,
each recipe with its own prompt format: answer-token loss on the held-out pairs (answer tokens only, end token
excluded), stop rate (greedy generation ends with <|im_end|> within 2x the reference length + 16 tokens).
Model FLOPs utilisation: 6 x N (the base's parameters) x the training tokens per second (padding excluded),
divided by the peak of this CPU read from a matmul micro-benchmark in fp32 and bf16 (`matmul_peak`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# kbloop's modules are imported inside the functions that use them: the seed recipe's child process
# (`--child seed`) is measured (time, peak memory) without them loaded.

SEED_SYSTEM = "You are a helpful assistant."
# guide200's shared instruction: the guide puts one such preamble on every row, the question in `input`.
GUIDE_PREAMBLE = "You are the company's HR and IT helpdesk assistant. Answer the employee's question accurately."
SHAPES = ("varied1000", "guide200")
HELDOUT_FRACTION = 0.1


def seed_prompt(question: str) -> str:
    # The seed's hard-coded template (ChatML written out by hand).
    return f"<|im_start|>system\n{SEED_SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def seed_user_text(pair: dict) -> str:
    """The seed's user turn: the instruction, then the input when there is one (the guide's layout)."""
    return f"{pair['instruction']}\n\n{pair['input']}" if pair.get("input") else pair["instruction"]


# --- Data ---------------------------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _unit_hash(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def qa_rows() -> list[dict]:
    """samples/qa.jsonl's question/answer rows (those without context), each question once."""
    rows, seen = [], set()
    for line in (REPO / "samples" / "qa.jsonl").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("input") or _norm(r["instruction"]) in seen:
            continue
        seen.add(_norm(r["instruction"]))
        rows.append({"question": r["instruction"], "answer": r["output"]})
    return rows


def split_rows(rows: list[dict], fraction: float = HELDOUT_FRACTION) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) by the hash of the answer: paraphrased questions of one answer stay together."""
    held = [r for r in rows if _unit_hash(_norm(r["answer"])) < fraction]
    train = [r for r in rows if _unit_hash(_norm(r["answer"])) >= fraction]
    return train, held


def joined_pairs(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    """n pairs, each joining 1-4 rows into one question and one answer (varied1000's shape)."""
    pairs, seen = [], set()
    while len(pairs) < n:
        k = rng.choice([1, 1, 2, 3, 4])  # varied length: many single answers, some long combined ones
        picked = rng.sample(rows, min(k, len(rows)))
        q = " Also: ".join(r["question"] for r in picked)
        if q in seen:
            continue
        seen.add(q)
        pairs.append({"instruction": q, "input": "", "output": " ".join(r["answer"] for r in picked)})
    return pairs


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\w{4,}")


def kb_sentences() -> list[tuple[str, list[str], set[str]]]:
    """(document name, its prose sentences in order, its words) for each Markdown document of samples/kb."""
    docs = []
    for path in sorted((REPO / "samples" / "kb").rglob("*.md")):
        sentences = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip().lstrip("-*> ").strip()
            if not line or line.startswith(("#", "|", "```")):
                continue
            sentences += [s for s in _SENTENCE_END.split(line) if len(s.split()) >= 4 and s[-1:] in ".!?"]
        if sentences:
            docs.append((path.name, sentences, set(_WORD.findall(" ".join(sentences).lower()))))
    return docs


def guide_pairs(rows: list[dict], n: int, rng: random.Random, docs) -> list[dict]:
    """n pairs in the guide's layout: the preamble as instruction, a sample question as input, and an answer of
    1-12 sentences: the sample answer, continued with consecutive sentences of the KB document sharing most words
    with the pair (guide200's shape)."""
    out = []
    for r in rng.sample(rows, min(n, len(rows))):
        words = set(_WORD.findall((r["question"] + " " + r["answer"]).lower()))
        _name, sentences, _ = max(docs, key=lambda d: (len(words & d[2]), d[0]))
        have = _SENTENCE_END.split(r["answer"].strip())
        extra = max(0, rng.randint(1, 12) - len(have))
        start = rng.randrange(max(1, len(sentences) - extra + 1))
        out.append({"instruction": GUIDE_PREAMBLE, "input": r["question"],
                    "output": " ".join(have + sentences[start:start + extra])})
    return out


def make_shape(shape: str, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs) in instruction/input/output form; held-out questions are never trained."""
    train_rows, held_rows = split_rows(qa_rows())
    rng = random.Random(seed)
    if shape == "varied1000":
        n_held = 1000 // 10
        return joined_pairs(train_rows, 1000 - n_held, rng), joined_pairs(held_rows, n_held, rng)
    if shape == "guide200":
        docs = kb_sentences()
        n_held = round(200 * len(held_rows) / (len(held_rows) + len(train_rows)))
        return guide_pairs(train_rows, 200 - n_held, rng, docs), guide_pairs(held_rows, n_held, rng, docs)
    raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")


def kbloop_examples(shape: str, train: list[dict], heldout: list[dict], work: Path) -> tuple[list, list]:
    """The pairs as kbloop trains and asks them: read through its import (store.formats), and for guide200 with
    the prompts `kbloop train` builds (retrieved passages, approved answers to related questions) from a
    workspace holding samples/kb and the training pairs (approved)."""
    from finetune.training.data import TrainingExample, build_training_examples

    if shape == "varied1000":  # the bench's own data: no passages (k_passages=0), as measured before
        convert = lambda ps: [TrainingExample(question=p["instruction"], input=p["input"], answer=p["output"])  # noqa: E731
                              for p in ps]
        return convert(train), convert(heldout)
    from finetune.training.config import TrainConfig, prompt_passages
    from store import open_db
    from store.documents import import_documents
    from store.examples import add_examples, list_examples
    from store.formats import read_examples_file

    def read(pairs: list[dict], name: str):
        path = work / name
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        found = read_examples_file(path)
        if found.layout != "guide":
            raise SystemExit(f"{path}: read as {found.layout!r}, not the guide's layout")
        return found.examples

    db = open_db(work / f"{shape}.db")
    import_documents(db, [REPO / "samples" / "kb"])
    add_examples(db, read(train, f"{shape}_train.jsonl"), status="approved", source="import", reviewer="bench")
    k = prompt_passages(TrainConfig(base="real"), tiny=False)  # the real-base default
    stored = {e.question: e for e in list_examples(db, status="approved")}
    trained = build_training_examples(db, [stored[p["input"]] for p in train], k=k)

    class Asked:  # a held-out question, asked as a new one: no id, no thread
        id = interaction_id = None

        def __init__(self, ex):
            self.question, self.input, self.answer = ex.question, ex.input, ex.answer

    asked = build_training_examples(db, [Asked(e) for e in read(heldout, f"{shape}_heldout.jsonl")], k=k)
    return trained, asked


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


def bench_base(home: Path, *, base_dir: str | None, pretrain_steps: int) -> str:
    """The bench base for a run in `home`: a copy of `base_dir` (one pretrained before) or one built now, without
    the `tiny` marker file build_base's folder carries. Pretrained, not random: kbloop must treat it as a real
    base (the guide's recipe, QLoRA, continued runs sized for real bases), not as `tiny`."""
    if base_dir:
        base = str(shutil.copytree(base_dir, home / "base10m"))
    else:
        base = build_base(home, pretrain_steps=pretrain_steps)
    (Path(base) / "TINY.md").unlink(missing_ok=True)
    return base


def matmul_peak(size: int = 1024, seconds: float = 3.0) -> dict:
    """This CPU's matmul throughput in fp32 and bf16 (GFLOP/s, best of repeated size x size products, all
    threads): the peak that model FLOPs utilisation divides by."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm up
        best, deadline = 0.0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * size**3 / (time.perf_counter() - t) / 1e9)
        out[f"{name}_gflops"] = round(best, 1)
    out.update(threads=torch.get_num_threads(), size=size)
    return out


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

    t, cpu = time.monotonic(), time.process_time()
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.eos_token  # the seed: pad = eos (<|im_end|>)
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=32, lora_dropout=0.1, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))

    def text_of(instruction, inp, output):
        return seed_prompt(seed_user_text({"instruction": instruction, "input": inp})) + output + "<|im_end|>"

    def tokenize_function(batch):  # fixed: iterate over rows, not column names
        texts = [text_of(*row) for row in zip(batch["instruction"], batch["input"], batch["output"])]
        return tokenizer(texts, truncation=True, max_length=a.seed_max_length, padding="max_length")

    ds = Dataset.from_list(train).map(tokenize_function, batched=True, remove_columns=["instruction", "input", "output"])
    args = TrainingArguments(output_dir=str(out / "ckpt"), num_train_epochs=a.epochs, per_device_train_batch_size=4,
                             gradient_accumulation_steps=4, learning_rate=a.lr, warmup_steps=0.1,
                             lr_scheduler_type=a.lr_scheduler, logging_steps=10, save_strategy="no", report_to="none",
                             fp16=False, use_cpu=True, disable_tqdm=True, seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    loop = time.monotonic()
    trainer.train()
    loop = time.monotonic() - loop
    model.save_pretrained(out / "adapter")
    seconds, cpu = time.monotonic() - t, time.process_time() - cpu
    data_tokens = sum(min(len(tokenizer(text_of(p["instruction"], p["input"], p["output"]))["input_ids"]),
                          a.seed_max_length) for p in train)
    return {"train_seconds": seconds, "loop_seconds": loop, "train_cpu_seconds": cpu, "steps": trainer.state.global_step,
            "data_tokens_per_epoch": data_tokens, "processed_tokens_per_epoch": a.seed_max_length * len(train),
            "lr_scheduler": args.lr_scheduler_type.value if hasattr(args.lr_scheduler_type, "value")
            else str(args.lr_scheduler_type)}


def train_kbloop(base: str, train: list, out: Path, a) -> dict:
    import bitsandbytes  # noqa: F401  (imported before the clock starts, as train_seed's are)
    import peft  # noqa: F401
    import transformers

    from finetune.model.loading import end_of_turn_id, load_tokenizer
    from finetune.training.config import TrainConfig
    from finetune.training.data import encode_examples
    from finetune.training.trainer import train_adapter

    # The settings (r=8, alpha 32, batch 4 x 4, the epochs, the lr, the schedule); kbloop's defaults for a
    # real base for the rest. varied1000 keeps its measured setting: no passages, the seed's max length.
    fixed = dict(max_length=a.seed_max_length, k_passages=0) if a.shape == "varied1000" else {}
    config = TrainConfig(base=base, method="qlora", rank=a.rank, alpha=32, dropout=0.1, targets="all-linear",
                         epochs=float(a.epochs), learning_rate=a.lr, batch_size=4, grad_accum=4, warmup=0.1,
                         lr_scheduler=a.lr_scheduler, **fixed)
    loop, train_loop = [], transformers.Trainer.train

    def timed_loop(trainer, *args, **kwargs):  # the loop alone, as train_seed times it
        started = time.monotonic()
        try:
            return train_loop(trainer, *args, **kwargs)
        finally:
            loop.append(time.monotonic() - started)

    transformers.Trainer.train = timed_loop
    t, cpu = time.monotonic(), time.process_time()
    outcome = train_adapter(config, train, out / "adapter")
    seconds, cpu = time.monotonic() - t, time.process_time() - cpu
    transformers.Trainer.train = train_loop
    tok = load_tokenizer(base)
    encoded, _ = encode_examples(tok, train, max_length=outcome.config.max_length, eot_id=end_of_turn_id(tok))
    return {"train_seconds": seconds, "loop_seconds": sum(loop), "train_cpu_seconds": cpu, "steps": outcome.steps,
            "notes": outcome.notes,
            "data_tokens_per_epoch": sum(len(e["input_ids"]) for e in encoded),
            "answer_tokens_per_epoch": sum(sum(1 for x in e["labels"] if x != -100) for e in encoded),
            "config": outcome.config.as_params(), "final_loss": outcome.final_loss}


# --- Evaluation (the parent process) ------------------------------------------------------------------


def evaluate(base: str, adapter: Path, heldout: list, prompt_of, answer_of, max_eval: int) -> dict:
    import torch

    from finetune.model.loading import load_model_for_inference

    model, tok = load_model_for_inference(base, adapter_path=adapter)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    nll, count, stopped = 0.0, 0, 0
    for item in heldout:
        prompt_ids = tok(prompt_of(tok, item), add_special_tokens=False)["input_ids"]
        answer_ids = tok(answer_of(item), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()  # predicts the answer
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(answer_ids), reduction="sum").item()
        count += len(answer_ids)
    for item in heldout[:max_eval]:
        prompt_ids = tok(prompt_of(tok, item), add_special_tokens=False, return_tensors="pt")
        budget = 2 * len(tok(answer_of(item), add_special_tokens=False)["input_ids"]) + 16
        with torch.no_grad():
            gen = model.generate(**prompt_ids, max_new_tokens=budget, eos_token_id=[eot], do_sample=False)
        stopped += eot in gen[0, prompt_ids["input_ids"].shape[1]:].tolist()
    return {"heldout_answer_loss": nll / count, "stop_rate": stopped / min(len(heldout), max_eval),
            "n_heldout": len(heldout), "n_generated": min(len(heldout), max_eval)}


def kbloop_prompt(tok, ex) -> str:
    """What kbloop's engine asks with: the one prompt builder, with the example's passages and approved answers."""
    from finetune.model.prompting import build_messages, render_prompt

    return render_prompt(tok, build_messages(ex.question, input=ex.input, passages=ex.passages, approved=ex.approved))


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
    if a.child == "seed":
        result = train_seed(base, json.loads((work / f"{a.shape}_seed_train.json").read_text()), work / a.out_name, a)
    else:
        from finetune.training.data import load_training_examples

        result = train_kbloop(base, load_training_examples(work / f"{a.shape}_kbloop_train.jsonl"),
                              work / a.out_name, a)
    result["peak_rss_mb"] = peak_rss_mb()
    (work / f"{a.out_name}.json").write_text(json.dumps(result))


# --- The runs ---------------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def run_shape(shape: str, base: str, work: Path, a, peak: dict, n_params: int, out: Path) -> dict:
    """Trains both recipes --runs times back to back; evaluates the first run's adapters; writes `out` after every
    run, so a bench stopped early keeps what it measured."""
    from finetune.training.data import save_training_examples

    train, heldout = make_shape(shape)
    if a.limit:  # a smoke test of the script, not a measurement
        train, heldout = train[: a.limit], heldout[: max(2, a.limit // 8)]
    (work / f"{shape}_seed_train.json").write_text(json.dumps(train))
    print(f"{shape}: {len(train)} training pairs, {len(heldout)} held-out; building kbloop's prompts", flush=True)
    kb_train, kb_heldout = kbloop_examples(shape, train, heldout, work)
    save_training_examples(work / f"{shape}_kbloop_train.jsonl", kb_train)
    trained_questions = {_norm(p["instruction"] + " " + p["input"]) for p in train}
    assert not any(_norm(p["instruction"] + " " + p["input"]) in trained_questions for p in heldout)
    results = {"shape": shape, "train": len(train), "heldout": len(heldout), "epochs": a.epochs, "rank": a.rank,
               "lr": a.lr, "lr_scheduler": a.lr_scheduler, "seed_max_length": a.seed_max_length,
               "pretrain_steps": a.pretrain_steps, "base_params": n_params, "cpu": os.cpu_count(),
               "matmul_peak": peak, "runs": [], "evaluation": {}}
    for run in range(a.runs):
        entry = {"load_avg_start": os.getloadavg()[0]}
        for name in ("kbloop", "seed"):
            out_name = f"{shape}_{name}_{run}"
            print(f"{shape} run {run + 1}/{a.runs}: training {name}", flush=True)
            cmd = [sys.executable, __file__, "--child", name, "--shape", shape, "--work", str(work),
                   "--out-name", out_name, "--epochs", str(a.epochs), "--rank", str(a.rank), "--lr", str(a.lr),
                   "--lr-scheduler", a.lr_scheduler, "--seed-max-length", str(a.seed_max_length)]
            subprocess.run(cmd, check=True)
            entry[name] = json.loads((work / f"{out_name}.json").read_text())
        entry["load_avg_end"] = os.getloadavg()[0]
        entry["time_ratio"] = entry["kbloop"]["train_seconds"] / entry["seed"]["train_seconds"]
        entry["loop_ratio"] = entry["kbloop"]["loop_seconds"] / entry["seed"]["loop_seconds"]
        results["runs"].append(entry)
        print(f"{shape} run {run + 1}: kbloop {entry['kbloop']['train_seconds']:.0f} s, seed "
              f"{entry['seed']['train_seconds']:.0f} s, ratio {entry['time_ratio']:.2f}, the loop alone "
              f"{entry['loop_ratio']:.2f} (load "
              f"{entry['load_avg_start']:.1f} -> {entry['load_avg_end']:.1f})", flush=True)
        _summarise(results, n_params, peak, a.epochs)
        out.write_text(json.dumps(results, indent=2))
        if run == 0 and a.max_eval:
            print(f"{shape}: evaluating the first run's adapters", flush=True)
            results["evaluation"] = {
                "seed": evaluate(base, work / f"{shape}_seed_0" / "adapter", heldout,
                                 lambda tok, p: seed_prompt(seed_user_text(p)), lambda p: p["output"], a.max_eval),
                "kbloop": evaluate(base, work / f"{shape}_kbloop_0" / "adapter", kb_heldout, kbloop_prompt,
                                   lambda ex: ex.answer, a.max_eval)}
        _summarise(results, n_params, peak, a.epochs)
        out.write_text(json.dumps(results, indent=2))
    return results


def _summarise(results: dict, n_params: int, peak: dict, epochs: int) -> None:
    runs = results["runs"]
    results["time_ratio"] = _spread([r["time_ratio"] for r in runs])
    results["loop_ratio"] = _spread([r["loop_ratio"] for r in runs])
    for name in ("seed", "kbloop"):
        seconds = [r[name]["train_seconds"] for r in runs]
        first = runs[0][name]
        tokens = first["data_tokens_per_epoch"] * epochs
        flops = 6 * n_params * tokens
        results[name] = {
            "train_seconds": _spread(seconds), "loop_seconds": _spread([r[name]["loop_seconds"] for r in runs]),
            "peak_rss_mb": _spread([r[name]["peak_rss_mb"] for r in runs]),
            "steps": first["steps"], "data_tokens_per_example": first["data_tokens_per_epoch"] / results["train"],
            "data_tokens": tokens, "model_tflop": flops / 1e12,
            "mfu_fp32": flops / statistics.median(seconds) / (peak["fp32_gflops"] * 1e9),
            "mfu_bf16": flops / statistics.median(seconds) / (peak["bf16_gflops"] * 1e9),
            **results["evaluation"].get(name, {}),
        }
        if "processed_tokens_per_epoch" in first:
            results[name]["processed_tokens_per_example"] = first["processed_tokens_per_epoch"] / results["train"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=(*SHAPES, "all"), default="all")
    p.add_argument("--runs", type=int, default=3, help="timed runs of both recipes, back to back")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-scheduler", default="cosine", help="both recipes' schedule")
    p.add_argument("--seed-max-length", type=int, default=256, help="the seed pads every example to this")
    p.add_argument("--pretrain-steps", type=int, default=300, help="next-token steps on the KB text for the base")
    p.add_argument("--base-dir", help="a base this script pretrained before (copied; its marker removed)")
    p.add_argument("--max-eval", type=int, default=100, help="held-out examples generated for the stop rate")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "out"))
    p.add_argument("--limit", type=int, default=0, help="train on the first N pairs only (a smoke test)")
    p.add_argument("--child", choices=["seed", "kbloop"])
    p.add_argument("--work")
    p.add_argument("--out-name")
    a = p.parse_args()
    if a.child:
        child(a)
        return
    work = Path(tempfile.mkdtemp(prefix="train-vs-seed-"))
    base = bench_base(work, base_dir=a.base_dir, pretrain_steps=a.pretrain_steps)
    (work / "base.txt").write_text(base)
    from finetune.model.loading import load_base_model

    n_params = sum(t.numel() for t in load_base_model(base).parameters())
    peak = matmul_peak()
    print(f"matmul peak: {peak}", flush=True)
    for shape in SHAPES if a.shape == "all" else (a.shape,):
        out = Path(a.out_dir) / f"train_vs_seed_{shape}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        results = run_shape(shape, base, work, a, peak, n_params, out)
        s, k, r = results["seed"], results["kbloop"], results["time_ratio"]
        print(f"\n{shape}: training time kbloop/seed median {r['median']:.2f} (runs {', '.join(f'{x:.2f}' for x in r['runs'])}; "
              f"target <= 0.5); kbloop {k['train_seconds']['median']:.0f} s vs {s['train_seconds']['median']:.0f} s; "
              f"tokens/example {k['data_tokens_per_example']:.0f} vs {s['data_tokens_per_example']:.0f} "
              f"({s.get('processed_tokens_per_example', 0):.0f} padded); MFU fp32 {k['mfu_fp32']:.1%} vs "
              f"{s['mfu_fp32']:.1%}" + (f"; held-out loss {k['heldout_answer_loss']:.3f} vs {s['heldout_answer_loss']:.3f}; "
                                        f"stop rate {k['stop_rate']:.0%} vs {s['stop_rate']:.0%}" if a.max_eval else "")
              + f"; peak RSS {k['peak_rss_mb']['median']:.0f} vs {s['peak_rss_mb']['median']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
