"""Answering: the answer engine (engine), retrieval over the KB (retrieval, embedding), approved answers
(verified), the models it serves (models), generation (scheduler: continuous batching on kv_cache; vllm) and
streamed text (streaming)."""
