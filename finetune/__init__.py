"""Everything about the model, in subpackages by job (ARCHITECTURE.md at the repository root maps them):

- finetune.model: loading a base (or building `tiny`), the one prompt builder, stop tokens;
- finetune.training: the typed config, the guide's recommendations, training data, the trainer, fused kernels,
  continued training;
- finetune.evaluation: metrics, and the promotion gate (pure);
- finetune.registry: adapter folders, training and evaluating candidates, promotion and rollback, export;
- finetune.serving: the answer engine, retrieval, embeddings, the KV cache, verified answers;
- finetune.jobs: the retraining queue, its worker, the child process and what they say to each other.
"""

import os

# OpenMP threads that wait by sleeping, not spinning, in every process that runs kbloop's models: set here, before
# torch loads (its OpenMP runtime reads it once), and inherited by the processes kbloop starts (job children,
# torchrun ranks). The bot, the engine, the embedder and a training job share a few cores: beside one busy core a
# greedy decode on `tiny` took 3.7 s spinning against 1.6 s passive, and the same on idle cores (1.08 s against
# 1.04 s; bench/openmp_wait.py, docs/benchmarks.md). A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
