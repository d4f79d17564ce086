"""Evaluation during distillation: held-out perplexity, KL to the teacher, passkey retrieval.

    evaluator = Evaluator(cfg.eval, tokenizer)
    evaluator(student, teacher, with_passkey=True)  # {"ppl", "heldout_kl", "passkey@N", ...}

The teacher and the student are measured the same way (single-process).
"""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hylo_jax.distill import losses
from hylo_jax.eval import passkey, perplexity

log = logging.getLogger("hylo_jax.distill")


@nnx.jit(static_argnames=("kl_chunk",))
def _heldout_kl_sums(student, teacher, batch, kl_chunk: int):
    ids, positions, segment_ids, mask = losses._batch_parts(batch)
    h_s = student.hidden(ids, positions, segment_ids)
    h_t = teacher.hidden(ids, positions, segment_ids)
    return losses.chunked_kl_and_ce(student, teacher, h_s, h_t, mask, kl_chunk=kl_chunk)


def heldout_kl(student, teacher, token_windows: np.ndarray, batch_size: int, kl_chunk: int = 256) -> float:
    """Mean KL(teacher || student) per token over held-out windows [N, T]."""
    kl = tokens = 0.0
    for start in range(0, len(token_windows) - batch_size + 1, batch_size):
        ids = jnp.asarray(token_windows[start : start + batch_size])
        mask = jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0)
        sums = _heldout_kl_sums(student, teacher, {"input_ids": ids, "loss_mask": mask}, kl_chunk)
        kl += float(sums["kl_sum"])
        tokens += float(sums["tokens"])
    if tokens == 0:
        raise ValueError(f"{len(token_windows)} held-out windows are fewer than one batch of {batch_size}")
    return kl / tokens


class Evaluator:
    """Held-out perplexity, KL to the teacher and passkey accuracy, measured the same
    way for teacher and student (single-process; see cfg.eval)."""

    def __init__(self, eval_cfg, tokenizer):
        self.cfg = eval_cfg
        self.tokenizer = tokenizer
        self.tokens = perplexity.heldout_tokens(
            tokenizer, eval_cfg.corpus, "heldout", max_tokens=eval_cfg.ppl_seq_len * eval_cfg.ppl_windows
        )
        self.windows = perplexity.windows(self.tokens, eval_cfg.ppl_seq_len, eval_cfg.ppl_windows)
        self.passkey_lengths = [int(n) for n in str(eval_cfg.passkey_lengths).split(",") if n.strip()]

    def perplexity(self, model) -> float:
        c = self.cfg
        return perplexity.perplexity(
            model, self.tokens, seq_len=c.ppl_seq_len, batch_size=c.batch_size, max_windows=c.ppl_windows
        )["ppl"]

    def passkey(self, model) -> dict[str, float]:
        out = {}
        for length in self.passkey_lengths:
            res = passkey.evaluate(
                model, self.tokenizer, length, n_trials=self.cfg.passkey_trials, seed=self.cfg.seed,
                prefill_chunk_size=self.cfg.passkey_prefill_chunk_size or None,
                batch_size=self.cfg.passkey_batch_size,
            )
            out[f"passkey@{length}"] = float(res["accuracy"])
            log.info("passkey at %d tokens: %d/%d", length, res["correct"], res["n_trials"])
        return out

    def __call__(self, student, teacher=None, *, with_passkey: bool = True) -> dict[str, float]:
        res = {"ppl": float(self.perplexity(student))}
        if teacher is not None:
            res["heldout_kl"] = heldout_kl(student, teacher, self.windows, self.cfg.batch_size)
        if with_passkey:
            res.update(self.passkey(student))
        return res
