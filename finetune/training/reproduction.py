"""Whether a model reproduces training answers exactly, decided by one teacher-forced pass: the check the
trainer stops on (finetune.training.sizing) and the `train_reproduced_exact` metric (finetune.evaluation.metrics)
share it. It reads examples as training encodes them (finetune.training.data) and applies a fused head as
training does (finetune.training.fused), so it lives with training, and evaluation imports it from here.
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.training.data import IGNORE_INDEX, CompletionCollator
from finetune.training.fused import CHUNK_BYTES


def reproduced_examples(model, encoded: Sequence[dict], *, pad_id: int, head_weight=None,
                        batch_size: int = 16) -> list[bool]:
    """For each encoded example (finetune.training.data.encode_example), would greedy decoding reproduce its answer?

    Greedy decoding emits the answer exactly, then stops, iff at every answer position (the end-of-turn
    token included) the argmax of the teacher-forced logits is the target token. So one forward pass, with
    logits only at the answer positions, decides it exactly for every example, far cheaper than generating.
    With `head_weight` (the head fused by finetune.training.fused) the head returns hidden states and the argmax is
    taken a chunk of rows at a time: no full (positions x vocabulary) logits.
    """
    import torch

    if not encoded:
        return []
    collate = CompletionCollator(pad_id=pad_id)
    was_training = model.training
    model.eval()
    head = model.get_output_embeddings()
    if head_weight is not None:
        head.train()  # the fused head passes hidden states through in training mode only
    device = next(model.parameters()).device
    out: list[bool] = []
    try:
        with torch.inference_mode():
            for i in range(0, len(encoded), batch_size):
                batch = collate(list(encoded[i : i + batch_size]))
                rows = model(input_ids=batch["input_ids"].to(device),
                             logits_to_keep=batch["logits_to_keep"].to(device)).logits
                rows = rows.reshape(-1, rows.shape[-1])  # (N, H) fused, else (N, V)
                labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
                targets = labels[labels != IGNORE_INDEX].to(device)  # (N,), row-major like rows
                if head_weight is None:
                    predicted = rows.argmax(-1)
                else:
                    step = max(1, CHUNK_BYTES // (4 * head_weight.shape[0]))
                    predicted = torch.cat([(rows[j : j + step] @ head_weight.T).argmax(-1)
                                           for j in range(0, rows.shape[0], step)])
                hits = (predicted == targets).tolist()
                start = 0
                for count in (labels != IGNORE_INDEX).sum(1).tolist():
                    out.append(all(hits[start : start + count]))
                    start += count
    finally:
        model.train(was_training)
    return out
