"""Does `tiny`, with kbloop's default settings, memorise training sets of any size?

    .venv/bin/python bench/tiny_sizes.py [--sizes 10,25,330,3000] [--max-minutes M]
        [--out bench/out/tiny_sizes.json]

The defaults size each run by what it must achieve (finetune/training/config.py TINY_DEFAULTS: at least 400
optimiser steps, stop at the first epoch end where every training answer is reproduced). For each size
this trains `tiny` with no options on the training split (10% held out by question hash, as the registry
does) through finetune.training.trainer.train_adapter, then measures reproduction two ways:
- the exact check training stops on (teacher-forced argmax at every answer position, TrainOutcome.reproduced);
- real greedy generation of every training answer (finetune.evaluation.metrics.generate_answers, the evaluation's
  and the engine's batched decoder), compared byte for byte and after the evaluation's normalisation.

Data: 10 and 25 examples are an even spread of samples/qa.jsonl (English and Chinese); 330 is all of it;
3,000 are made from templates (half English, half Chinese, every question distinct), since the samples
have 330. `--max-minutes` stops a size's training (cancellation) and records what it had reached, to
project sizes that do not fit the machine's time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.evaluation.metrics import EvalConfig, exact_match, generate_answers, sample_for_reproduction  # noqa: E402
from finetune.model.loading import load_model_for_inference  # noqa: E402
from finetune.model.tiny import ensure_tiny_base  # noqa: E402
from finetune.training.config import TrainConfig  # noqa: E402
from finetune.training.data import TrainingExample, split_heldout  # noqa: E402
from finetune.training.trainer import TrainingCancelled, train_adapter  # noqa: E402

SAMPLES = REPO / "samples"


def sample_pairs() -> list[TrainingExample]:
    rows = [json.loads(line) for line in (SAMPLES / "qa.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return [TrainingExample(question=r["instruction"], input=r.get("input", ""), answer=r["output"]) for r in rows]


def spread(pairs: list, n: int) -> list:
    """n pairs evenly spread over the file (it alternates topics and languages)."""
    step = len(pairs) / n
    return [pairs[int(i * step)] for i in range(n)]


_EN_TOPICS = ["travel booking", "expense claim", "laptop replacement", "parental leave", "badge access",
              "VPN token", "conference budget", "desk booking", "parking permit", "training budget",
              "sick note", "home-office allowance", "visa letter", "relocation support", "bike lease"]
_EN_TEAMS = ["Payments", "Search", "Mobile", "Data", "Platform", "Security", "Growth", "Billing", "Support",
             "Design", "Legal", "Finance", "Sales", "Marketing", "Infra", "Research", "Ops", "Identity",
             "Recruiting", "Facilities"]
_EN_PEOPLE = ["Anna Vogel", "Ben Ortiz", "Chen Li", "Dana Kim", "Emil Novak", "Fatima Aziz", "Gustav Berg",
              "Hana Sato", "Ivan Petrov", "Julia Moreau"]
_ZH_TOPICS = ["差旅预订", "费用报销", "电脑更换", "育儿假", "门禁卡", "VPN令牌", "会议预算", "工位预订", "停车证",
              "培训预算", "病假证明", "居家办公补贴", "签证信函", "搬迁支持", "自行车租赁"]
_ZH_TEAMS = ["支付组", "搜索组", "移动组", "数据组", "平台组", "安全组", "增长组", "账单组", "客服组", "设计组",
             "法务组", "财务组", "销售组", "市场组", "基础设施组", "研究组", "运维组", "身份组", "招聘组", "行政组"]
_ZH_PEOPLE = ["王芳", "李伟", "张敏", "刘洋", "陈静", "杨磊", "赵婷", "黄勇", "周杰", "吴倩"]


def template_pairs(n: int, seed: int = 0) -> list[TrainingExample]:
    """n distinct QA pairs, half English, half Chinese: (topic, team) picks the question, the facts vary."""
    rng = random.Random(seed)
    out: list[TrainingExample] = []
    combos = [(t, g) for t in range(len(_EN_TOPICS)) for g in range(len(_EN_TEAMS))]  # 300 per variant
    variants = range(6)
    keys = [(lang, v, t, g) for lang in ("en", "zh") for v in variants for t, g in combos]
    rng.shuffle(keys)
    for lang, v, t, g in keys[:n]:
        person = rng.randrange(10)
        days, amount, floor = rng.randint(2, 30), rng.randint(1, 40) * 50, rng.randint(1, 9)
        if lang == "en":
            topic, team, who = _EN_TOPICS[t], _EN_TEAMS[g], _EN_PEOPLE[person]
            q = [f"How does the {team} team handle a {topic} request?",
                 f"Who approves {topic} for the {team} team?",
                 f"How long does a {topic} request take in {team}?",
                 f"What is the limit for {topic} in the {team} team?",
                 f"Where do {team} people pick up their {topic} paperwork?",
                 f"Can someone in {team} get {topic} without a manager?"][v]
            a = [f"{team} sends {topic} requests to {who}; they are handled within {days} days.",
                 f"{who} approves {topic} for {team}, up to {amount} EUR.",
                 f"In {team}, a {topic} request takes {days} working days after {who} signs it.",
                 f"The {team} limit for {topic} is {amount} EUR a year; ask {who} for more.",
                 f"{team} picks it up on floor {floor} from {who}, within {days} days of the request.",
                 f"No: {who} must approve {topic} for {team} first; allow {days} days."][v]
        else:
            topic, team, who = _ZH_TOPICS[t], _ZH_TEAMS[g], _ZH_PEOPLE[person]
            q = [f"{team}如何处理{topic}申请?", f"{team}的{topic}由谁审批?", f"{team}的{topic}申请需要多久?",
                 f"{team}的{topic}额度是多少?", f"{team}的同事在哪里领取{topic}材料?", f"{team}的人不经经理能办{topic}吗?"][v]
            a = [f"{team}的{topic}申请交给{who},{days}天内处理。", f"{who}审批{team}的{topic},上限{amount}欧元。",
                 f"{team}的{topic}申请在{who}签字后需要{days}个工作日。", f"{team}的{topic}额度为每年{amount}欧元,超出请找{who}。",
                 f"{team}在{floor}楼找{who}领取,申请后{days}天内可取。", f"不能:{team}的{topic}须先经{who}批准,请预留{days}天。"][v]
        out.append(TrainingExample(question=q, input="", answer=a))
    return out


def examples_for(size: int) -> tuple[list[TrainingExample], str]:
    pairs = sample_pairs()
    if size < len(pairs):
        return spread(pairs, size), f"{size} of samples/qa.jsonl, evenly spread"
    if size == len(pairs):
        return pairs, "samples/qa.jsonl"
    return template_pairs(size), f"{size} template pairs (half English, half Chinese)"


def run_size(size: int, tiny_path: str, workdir: Path, *, max_minutes: float | None, gen_sample: int) -> dict:
    examples, source = examples_for(size)
    train, heldout = split_heldout(examples)
    deadline = time.monotonic() + max_minutes * 60 if max_minutes else None
    seen: list = []
    load_start = os.getloadavg()[0]
    started = time.monotonic()
    out = workdir / f"n{size}"
    result: dict = {"size": size, "data": source, "train": len(train), "heldout": len(heldout)}
    try:
        outcome = train_adapter(TrainConfig(base=tiny_path), train, out, on_step=seen.append,
                                should_stop=(lambda: time.monotonic() > deadline) if deadline else None)
    except TrainingCancelled:
        last = seen[-1]
        result.update({"completed": False, "stopped_by_time_limit_min": max_minutes, "steps": last.step,
                       "budget_steps": last.total_steps, "epoch": last.epoch,
                       "train_s": time.monotonic() - started, "loss": last.loss,
                       "losses_every_epoch": _per_epoch(seen)})
        return result
    train_s = time.monotonic() - started
    model, tokenizer = load_model_for_inference(tiny_path, adapter_path=out)
    checked = sample_for_reproduction(train, gen_sample) if gen_sample and len(train) > gen_sample else train
    t0 = time.monotonic()
    gens = generate_answers(model, tokenizer, checked, config=EvalConfig(generation_batch_size=16))
    gen_s = time.monotonic() - t0
    result.update({
        "completed": True, "steps": outcome.steps, "budget_steps": outcome.budget_steps, "epochs": outcome.epochs,
        "stopped_early": outcome.stopped_early, "train_s": round(train_s, 1), "final_loss": outcome.final_loss,
        "reproduced_exact_check": outcome.reproduced,
        "generated_checked": len(checked),
        "generated_byte_equal": sum(g.text == ex.answer.strip() for g, ex in zip(gens, checked)) / len(checked),
        "generated_normalised": sum(exact_match(g.text, ex.answer) for g, ex in zip(gens, checked)) / len(checked),
        "generated_stopped": sum(g.stopped for g in gens) / len(checked), "generation_s": round(gen_s, 1),
        "notes": outcome.notes, "losses_every_epoch": _per_epoch(seen),
        "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0],
        "misses": [{"q": ex.question, "expected": ex.answer, "got": g.text}
                   for g, ex in zip(gens, checked) if g.text != ex.answer.strip()][:10],
    })
    return result


def _per_epoch(steps: list) -> list[tuple[float, float]]:
    """(epoch, loss) at each whole epoch: the loss curve, short."""
    out, next_epoch = [], 1.0
    for info in steps:
        if info.epoch >= next_epoch - 1e-6 and info.loss is not None:
            out.append((round(info.epoch, 2), round(info.loss, 4)))
            next_epoch = int(info.epoch) + 1.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,25,330,3000")
    parser.add_argument("--max-minutes", type=float, default=None, help="cap on each size's training time")
    parser.add_argument("--gen-sample", type=int, default=500, help="generate at most this many training answers")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "tiny_sizes.json"))
    args = parser.parse_args()

    results = {"machine": f"{os.cpu_count()} CPU cores, no GPU", "sizes": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        texts = [p.read_text(encoding="utf-8") for p in sorted((SAMPLES / "kb").rglob("*")) if p.is_file()]
        tiny_path = str(ensure_tiny_base(Path(tmp), texts))
        for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
            r = run_size(size, tiny_path, Path(tmp), max_minutes=args.max_minutes, gen_sample=args.gen_sample)
            results["sizes"].append(r)
            out.write_text(json.dumps(results, indent=2, ensure_ascii=False))  # each size as soon as it is done
            print(json.dumps({k: v for k, v in r.items() if k not in ("losses_every_epoch", "misses")},
                             ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
