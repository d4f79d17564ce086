"""Held-out perplexity of a CausalLM on real text.

The token stream is cut into non-overlapping windows of `seq_len` tokens; each window
is scored on its own (token t predicted from tokens < t of the same window, the first
token of a window is context only), and the mean negative log-likelihood is taken over
every scored token (not per window or per batch). The loss is computed from the final
hidden states and the lm_head `chunk` positions at a time, so [B, T, vocab] logits are
never held whole.

`heldout_tokens` builds the stream from the held-out split of a corpus in
hylo_jax.eval.corpus (real text on disk, e.g. the pydoc_data.topics prose), documents
joined by the tokenizer's end-of-sequence token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hylo_jax.eval import corpus as corpus_lib


def heldout_tokens(tokenizer, corpus: str = "pydoc_topics", split: str = "heldout", max_tokens: int | None = None):
    """int32 token ids of `split` of `corpus`, documents separated by EOS."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in corpus_lib.documents(corpus, split):
        ids.extend(tokenizer.encode(doc.text, add_special_tokens=False))
        if eos is not None:
            ids.append(int(eos))
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if not ids:
        raise ValueError(f"corpus {corpus!r} split {split!r} has no text on this machine")
    return np.asarray(ids[:max_tokens] if max_tokens else ids, np.int32)


def windows(token_ids: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """[N, seq_len] non-overlapping windows of a 1-D stream (the tail that does not fill one is dropped)."""
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {token_ids.shape}")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (one context token and one target)")
    n = len(token_ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{len(token_ids)} tokens do not fill one window of {seq_len}")
    return token_ids[: n * seq_len].reshape(n, seq_len)


def nll_from_hidden(model, h_btd: jax.Array, targets_bt: jax.Array, weight_bt: jax.Array, chunk: int) -> jax.Array:
    """sum(weight * -log p(target)) from final hidden states, `chunk` positions of logits at a time."""
    b, t, d = h_btd.shape
    pad = (-t) % chunk
    h = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d)
    targets = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(b, -1, chunk)
    weight = jnp.pad(weight_bt.astype(jnp.float32), ((0, 0), (0, pad))).reshape(b, -1, chunk)

    def body(total, xs):
        h_c, tgt_c, w_c = xs
        logits = model.logits_from_hidden(h_c)  # [B, chunk, V] float32
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tgt_c[..., None], axis=-1)[..., 0]
        return total + jnp.sum(nll * w_c), None

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (h, targets, weight))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total


@nnx.jit(static_argnames="chunk")
def _nll_sum(model, ids_bt: jax.Array, weight_b: jax.Array, chunk: int) -> jax.Array:
    """Sum over scored tokens of -log p, windows weighted by weight_b (0 for padding)."""
    h = model.hidden(ids_bt)[:, :-1]
    weight = jnp.broadcast_to(weight_b[:, None], h.shape[:2])
    return nll_from_hidden(model, h, ids_bt[:, 1:], weight, chunk)


def perplexity(model, token_ids: np.ndarray, *, seq_len: int = 512, batch_size: int = 4, chunk: int = 128,
               max_windows: int | None = None) -> dict:
    """-> {"nll": mean nats per scored token, "ppl": exp(nll), "tokens": scored tokens,
    "windows": N, "seq_len": seq_len}."""
    win = windows(token_ids, seq_len, max_windows)
    total = 0.0
    for start in range(0, len(win), batch_size):
        batch = win[start : start + batch_size]
        weight = np.ones(batch_size, np.float32)
        if len(batch) < batch_size:  # pad the last batch so one compiled shape serves all
            weight[len(batch):] = 0.0
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - len(batch), axis=0)])
        total += float(_nll_sum(model, jnp.asarray(batch), jnp.asarray(weight), min(chunk, seq_len - 1)))
    tokens = len(win) * (seq_len - 1)
    nll = total / tokens
    return {"nll": nll, "ppl": math.exp(nll), "tokens": tokens, "windows": len(win), "seq_len": seq_len}
