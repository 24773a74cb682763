"""Everything about the model, in subpackages by job (ARCHITECTURE.md at the repository root maps them):

- finetune.model: loading a base (or building `tiny`), the one prompt builder, stop tokens;
- finetune.training: the typed config, the guide's recommendations, training data, the trainer, fused kernels,
  continued training;
- finetune.evaluation: metrics, and the promotion gate (pure);
- finetune.registry: adapter folders, training and evaluating candidates, promotion and rollback, export;
- finetune.serving: the answer engine, retrieval, embeddings, the KV cache, verified answers;
- finetune.jobs: the retraining queue, its worker, the child process and what they say to each other.
"""
