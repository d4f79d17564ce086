"""Models as predictors for the tasks: token prompts in, generated text out, scored.

`predictor(model, tokenizer)` decodes greedily with the caches (chunked prefill,
hylo_jax.inference.generate) and stops each row at the tokenizer's EOS; prompts of
one task and length all have the same length, so they run as batches. Any other
callable ids [B, T] -> logits [B, T, V] is decoded by re-running it on the growing
sequence (used by tests with hand-written models). A predictor is just
`fn(samples, max_new_tokens) -> [text]`, so an oracle is one line.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

Predictor = Callable[[Sequence, int], list]


def greedy_tokens(model, input_ids: np.ndarray, num_tokens: int, *, eos_token_id=None, prefill_chunk_size=None) -> np.ndarray:
    """num_tokens greedy tokens after input_ids [B, T] -> int32 [B, num_tokens]."""
    input_ids = np.asarray(input_ids, np.int32)
    if hasattr(model, "init_cache") and hasattr(model, "step"):
        from hylo_jax.inference import generate

        return generate(model, input_ids, num_tokens, eos_token_id=eos_token_id,
                        prefill_chunk_size=prefill_chunk_size).tokens
    ids = input_ids
    for _ in range(num_tokens):
        nxt = np.asarray(jnp.argmax(model(jnp.asarray(ids))[:, -1], axis=-1), np.int32)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    return ids[:, input_ids.shape[1] :]


def predictor(model, tokenizer, *, batch_size: int = 1, prefill_chunk_size: int | None = None,
              eos_token_id=None) -> Predictor:
    """Greedy text predictions of `model` (EOS: the tokenizer's unless given)."""
    from hylo_jax.inference.text import as_ids

    eos = as_ids(tokenizer.eos_token_id if eos_token_id is None else eos_token_id)

    def predict(samples, max_new_tokens: int) -> list[str]:
        texts = []
        for lo in range(0, len(samples), batch_size):
            batch = np.stack([s.input_ids for s in samples[lo : lo + batch_size]])
            new = greedy_tokens(model, batch, max_new_tokens, eos_token_id=eos, prefill_chunk_size=prefill_chunk_size)
            for row in new:
                # Text up to the first EOS (a cached decode pads after it, a recomputed one goes on).
                ends = [i for i, t in enumerate(row.tolist()) if t in eos]
                row = row[: ends[0]] if ends else row
                texts.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
        return texts

    return predict


def run_samples(task, predict: Predictor, samples: Sequence) -> dict:
    """-> {"accuracy": mean score, "n", "records": [{"answers", "prediction", "score", "depth"}]}."""
    predictions = predict(samples, task.max_new_tokens)
    records = [
        {"answers": list(s.answers), "prediction": p, "score": float(task.score(p, s)), "depth": s.depth}
        for s, p in zip(samples, predictions)
    ]
    accuracy = sum(r["score"] for r in records) / len(records) if records else float("nan")
    return {"accuracy": accuracy, "n": len(records), "records": records}
