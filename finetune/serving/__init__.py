"""Answering: the answer engine (engine), retrieval over the KB (retrieval, embedding), batched generation
(kv_cache) and approved answers (verified)."""
