"""Training on the tiny base: LoRA, QLoRA (bitsandbytes on this CPU), full; callbacks, cancel, resume, errors.

Each run is a handful of steps on short prompts; the expensive base is built once per module.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from finetune.training.config import TrainConfig
from finetune.training.data import TrainingExample, save_training_examples
from store import StoreError
from tests.conftest import REPO, SAMPLES

pytestmark = pytest.mark.slow


def _qa(n: int) -> list[TrainingExample]:
    rows = [json.loads(line) for line in (SAMPLES / "qa.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return [TrainingExample(question=r["instruction"], input=r.get("input", ""), answer=r["output"], passages=[])
            for r in rows[:n]]


def _config(tiny_path, **kw) -> TrainConfig:
    # Short runs: what is tested is the machinery, not the quality.
    values = dict(base=tiny_path, method="lora", rank=4, alpha=8, epochs=1.0, batch_size=4, grad_accum=1,
                  max_length=160, k_passages=0)
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def lora_run(tiny_path, tmp_path_factory):
    from finetune.training.trainer import train_adapter

    steps = []
    out = tmp_path_factory.mktemp("lora") / "adapter"
    outcome = train_adapter(_config(tiny_path, epochs=2.0), _qa(12), out, on_step=steps.append)
    return outcome, steps, out


def test_lora_writes_a_peft_adapter_folder(lora_run):
    outcome, _, out = lora_run
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "checkpoints" not in names and ".writing" not in names
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert not cfg.get("modules_to_save")
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert outcome.method == "lora" and outcome.config.rank == 4 and outcome.n_examples == 12


def test_on_step_reports_every_step_with_loss_and_eta(lora_run):
    outcome, steps, _ = lora_run
    assert [s.step for s in steps] == list(range(1, outcome.steps + 1))
    assert outcome.steps == 6  # 12 examples / batch 4 x 2 epochs
    assert all(s.total_steps == 6 and s.loss is not None and s.loss > 0 for s in steps)
    assert steps[-1].eta_s == pytest.approx(0.0, abs=1e-6) and steps[-1].epoch == pytest.approx(2.0)
    assert outcome.losses[-1][1] == steps[-1].loss


def test_adapter_loads_for_inference_and_stops_at_im_end(lora_run, tiny_path):
    from finetune.model.loading import load_model_for_inference

    _, _, out = lora_run
    model, tokenizer = load_model_for_inference(tiny_path, adapter_path=out)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    assert model.generation_config.do_sample is False
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "training changed nothing"


def test_gradient_checkpointing_auto_recomputes_when_activations_would_crowd_memory_and_qlora_mlps(tiny_path,
                                                                                                   monkeypatch):
    from types import SimpleNamespace

    import psutil
    from transformers import AutoConfig

    from finetune.training.memory import MLP_CHECKPOINT_SHARE, activation_bytes, choose_checkpointing

    # Qwen2.5-0.5B (24 layers, hidden 896), batch 4 x 1024 tokens in fp32: ~5.6 GB of activations.
    qwen = activation_bytes(SimpleNamespace(hidden_size=896, num_hidden_layers=24), batch_size=4, max_length=1024,
                            dtype_bytes=4)
    assert 5e9 < qwen < 6.5e9
    off, why = choose_checkpointing(_config(tiny_path, batch_size=4, max_length=160))
    assert off is False and "GiB free RAM" in why and "batch 4 x 160 tokens" in why
    whole, _ = choose_checkpointing(_config(tiny_path, batch_size=100_000, max_length=2048))
    assert whole is True
    # QLoRA recomputes its feed-forward blocks only when memory asks for it: between 1/16 and 1/4 of what is free.
    small = _config(tiny_path, method="qlora", batch_size=4, max_length=160)
    off, _ = choose_checkpointing(small)
    assert off is False
    need = activation_bytes(AutoConfig.from_pretrained(tiny_path), batch_size=4, max_length=160, dtype_bytes=4)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=need * MLP_CHECKPOINT_SHARE // 2))
    mlp, why = choose_checkpointing(small)
    assert mlp == "mlp" and why.startswith("feed-forward blocks only")
    off, _ = choose_checkpointing(_config(tiny_path, method="lora", batch_size=4, max_length=160))
    assert off is False  # LoRA keeps everything below a quarter


def test_gradient_checkpointing_works_with_lora(tiny_path, tmp_path):
    from finetune.training.trainer import train_adapter

    out = tmp_path / "gc"
    outcome = train_adapter(_config(tiny_path, gradient_checkpointing=True, learning_rate=1e-2), _qa(8), out)
    from safetensors.torch import load_file

    weights = load_file(out / "adapter_model.safetensors")
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b), "some LoRA layers got no gradient through checkpointing"
    assert outcome.steps == 2


def test_mlp_checkpointing_keeps_less_for_the_backward_pass_and_gives_the_same_gradients(tiny_path):
    import torch

    from finetune.training.config import resolve_config
    from finetune.training.model_setup import prepare_model as _prepare_model

    ids = torch.randint(10, 300, (2, 48))
    results = {}
    for mode in (False, "mlp"):
        cfg, _ = resolve_config(_config(tiny_path, method="qlora", dropout=0.1, gradient_checkpointing=mode),
                                tiny=True, n_examples=8)
        torch.manual_seed(0)
        model = _prepare_model(cfg)
        for name, p in model.named_parameters():  # lora_B starts at zero: give it values so every grad is live
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        model.train()
        kept = []

        def pack(t, kept=kept):
            kept.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[mode] = (sum(kept), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (kept_all, grads_all), (kept_mlp, grads_mlp) = results[False], results["mlp"]
    assert kept_mlp < 0.8 * kept_all
    assert grads_mlp.keys() == grads_all.keys() and any("mlp" in n for n in grads_all)
    for name, grad in grads_all.items():
        torch.testing.assert_close(grads_mlp[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_qlora_quantises_the_base_with_bitsandbytes_on_this_machine(tiny_path, tmp_path):
    import bitsandbytes as bnb

    from finetune.training.config import resolve_config
    from finetune.training.model_setup import prepare_model as _prepare_model
    from finetune.training.trainer import train_adapter

    cfg, _ = resolve_config(_config(tiny_path, method="qlora"), tiny=True, n_examples=8)
    model = _prepare_model(cfg)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 7 * model.config.num_hidden_layers
    assert linear4[0].weight.quant_type == "nf4" and linear4[0].weight.quant_state.nested  # double quantisation
    del model
    outcome = train_adapter(_config(tiny_path, method="qlora"), _qa(8), tmp_path / "q")
    assert outcome.method == "qlora" and (tmp_path / "q" / "adapter_model.safetensors").exists()
    assert outcome.final_loss is not None and outcome.final_loss == outcome.final_loss  # not NaN


def test_full_fine_tuning_writes_a_model_folder(tiny_path, tmp_path):
    from finetune.model.loading import load_model_for_inference
    from finetune.training.trainer import train_adapter

    out = tmp_path / "full"
    outcome = train_adapter(_config(tiny_path, method="full", learning_rate=1e-3), _qa(8), out)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert not (out / "adapter_config.json").exists()
    assert outcome.trainable_params == outcome.total_params
    model, _ = load_model_for_inference(tiny_path, adapter_path=out)
    assert model is not None


def test_tiny_learns_answers_and_to_stop(tiny_path, tmp_path):
    """On tiny's defaults a small set is memorised: the run stops once every answer is reproduced, and the
    exact check it stops on agrees with real greedy generation, answer by answer."""
    import torch

    from finetune.model.loading import end_of_turn_id, load_model_for_inference
    from finetune.model.prompting import build_messages, render_prompt
    from finetune.training.data import encode_examples
    from finetune.training.reproduction import reproduced_examples
    from finetune.training.trainer import train_adapter

    examples = _qa(10)
    out = tmp_path / "memorise"
    outcome = train_adapter(TrainConfig(base=tiny_path, max_length=256), examples, out)
    assert outcome.config.method == "full" and outcome.config.min_steps == 400
    assert outcome.stopped_early and outcome.reproduced == 1.0 and outcome.steps < outcome.budget_steps == 400
    assert any(n.startswith("10 examples make 2 steps per epoch") for n in outcome.notes)
    assert any(n.startswith(f"stopped at step {outcome.steps} of 400: 100.0% of the 10 training answers")
               for n in outcome.notes)
    model, tok = load_model_for_inference(tiny_path, adapter_path=out)
    stops = model.generation_config.eos_token_id
    generated = []
    for ex in examples:
        prompt = render_prompt(tok, build_messages(ex.question))
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=80)[0, ids["input_ids"].shape[1]:].tolist()
        assert any(t in stops for t in gen)
        generated.append(tok.decode(gen, skip_special_tokens=True).strip() == ex.answer)
    encoded, _ = encode_examples(tok, examples, max_length=256, eot_id=end_of_turn_id(tok))
    assert reproduced_examples(model, encoded, pad_id=tok.pad_token_id) == generated == [True] * 10
    # An answer the model was not trained on is not "reproduced".
    other, _ = encode_examples(tok, [TrainingExample(examples[0].question, "", examples[1].answer)],
                               max_length=256, eot_id=end_of_turn_id(tok))
    assert reproduced_examples(model, other, pad_id=tok.pad_token_id) == [False]


def test_small_sets_train_at_least_the_step_floor_and_explicit_epochs_mean_what_they_say():
    from finetune.training.config import resolve_config
    from finetune.training.sizing import run_budget

    tiny, _ = resolve_config(TrainConfig(base="tiny"), tiny=True, n_examples=23)
    budget = run_budget(tiny, 23, world=1)  # 3 steps an epoch: 20 epochs would be 60 steps
    assert (budget.epochs, budget.steps) == (134.0, 402) and "fewer than the minimum 400" in budget.note
    assert run_budget(tiny, 330, world=1).epochs == 20.0  # 42 steps an epoch: the epochs decide
    explicit, _ = resolve_config(TrainConfig(base="tiny", epochs=2.0), tiny=True, n_examples=23)
    assert explicit.min_steps == 0 and run_budget(explicit, 23, world=1).steps == 6
    real, _ = resolve_config(TrainConfig(base="Qwen/Qwen2.5-0.5B-Instruct"), tiny=False, n_examples=23)
    assert (real.epochs, real.min_steps, real.stop_reproduced) == (3.0, 0, 0.0)


def test_should_stop_cancels_and_writes_no_adapter(tiny_path, tmp_path):
    from finetune.training.trainer import TrainingCancelled, train_adapter

    seen = []
    out = tmp_path / "cancel"
    # should_stop is polled at the end of each step, before that step's on_step report.
    with pytest.raises(TrainingCancelled, match="step 3"):
        train_adapter(_config(tiny_path, epochs=3.0), _qa(12), out, on_step=seen.append,
                      should_stop=lambda: len(seen) >= 2)
    assert not (out / "adapter_model.safetensors").exists()


def test_resume_continues_from_the_last_checkpoint(tiny_path, tmp_path):
    """An interrupted run resumes where its checkpoint left it and logs the same losses as an uninterrupted one."""
    from finetune.training.trainer import TrainingCancelled, train_adapter

    config = _config(tiny_path, epochs=2.0, save_steps=2, dropout=0.0)
    full = train_adapter(config, _qa(12), tmp_path / "straight")

    out = tmp_path / "interrupted"
    seen = []
    with pytest.raises(TrainingCancelled):
        train_adapter(config, _qa(12), out, on_step=seen.append, should_stop=lambda: len(seen) >= 3)
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    resumed = train_adapter(config, _qa(12), out, resume=True)
    assert resumed.resumed_from_step == 2
    assert resumed.steps == full.steps == 6
    assert [s for s, _ in resumed.losses] == [3, 4, 5, 6]
    for (_, a), (_, b) in zip(resumed.losses, full.losses[2:]):
        assert a == pytest.approx(b, rel=1e-2)
    assert not (out / "checkpoints").exists()


def test_bad_inputs_fail_with_clear_messages(tiny_path, tmp_path):
    from finetune.training.trainer import train_adapter

    with pytest.raises(StoreError, match="only 3 training examples; at least 8"):
        train_adapter(_config(tiny_path), _qa(3), tmp_path / "few")
    with pytest.raises(StoreError, match=r"rank 512 is larger than the smallest targeted layer .*\(\d+ features\)"):
        train_adapter(_config(tiny_path, rank=512), _qa(8), tmp_path / "rank")
    with pytest.raises(StoreError, match="could not be loaded.*without the model hub needs KBLOOP_BASE_MODEL set"):
        train_adapter(_config(str(tmp_path / "no-such-model")), _qa(8), tmp_path / "nobase")
    with pytest.raises(StoreError, match="target module"):
        train_adapter(_config(tiny_path, targets=("nope_proj",)), _qa(8), tmp_path / "targets")


def test_base_without_chat_template_is_refused(tiny_path, tmp_path):
    from finetune.training.trainer import train_adapter

    plain = tmp_path / "plain-base"
    shutil.copytree(tiny_path, plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(StoreError, match="has no chat template"):
        train_adapter(_config(str(plain)), _qa(8), tmp_path / "x")


def test_disk_full_leaves_no_half_adapter(tiny_path, tmp_path, monkeypatch):
    """ENOSPC while writing the adapter: a clear error, and no adapter file left behind."""
    from peft import PeftModel

    from finetune.training.trainer import train_adapter

    real_save = PeftModel.save_pretrained

    def save_then_fill_the_disk(self, save_directory, **kw):
        real_save(self, save_directory, **kw)  # half-written: the weights are there, the tokenizer is not
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", save_then_fill_the_disk)
    out = tmp_path / "full-disk"
    with pytest.raises(StoreError, match="disk full while writing"):
        train_adapter(_config(tiny_path), _qa(8), out)
    # Only the resumable checkpoints remain; nothing at the top, where a finished adapter would be.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


def test_two_process_data_parallel_training_on_gloo(tiny_path, tmp_path):
    """`torchrun --nproc_per_node 2 -m finetune.training.trainer`: the same code, two CPU processes, one valid adapter."""
    from finetune.model.loading import load_model_for_inference

    data = tmp_path / "train.jsonl"
    save_training_examples(data, _qa(16))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(_config(tiny_path, epochs=1.0).as_params()))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "finetune.training.trainer", "--config", str(cfg), "--data", str(data), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert report["world_size"] == 2
    assert report["steps"] == 2  # 16 examples / (batch 4 x 2 processes)
    model, _ = load_model_for_inference(tiny_path, adapter_path=out)
    assert any("lora_B" in n for n, _ in model.named_parameters())
