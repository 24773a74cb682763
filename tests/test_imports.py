"""The command root and the packages users import start without the model stack: `kbloop --help`, the bot's
acknowledgements and the store's commands must not pay for loading torch, transformers or gradio."""

import os
import subprocess
import sys

from tests.conftest import REPO


def test_command_root_and_packages_import_without_the_model_stack_or_gradio():
    code = ("import sys, kbloop.cli, kbloop.cli.app, bot, playground, store\n"
            "print(','.join(m for m in ('torch', 'transformers', 'peft', 'gradio') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported at start-up: {proc.stdout.strip()}"


def test_model_code_sets_passive_openmp_waiting_before_torch_loads_unless_the_user_chose():
    code = ("import os, sys, finetune.training.config\n"
            "assert 'torch' not in sys.modules\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "passive"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**env, "OMP_WAIT_POLICY": "active"})
    assert proc.stdout.strip() == "active"
