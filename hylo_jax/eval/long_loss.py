"""Loss by position over long real documents: where a model stops using its context.

The text is the held-out split of a corpus (hylo_jax.eval.corpus) in its natural
reading order: documents sorted by path (a package's modules one after the other),
each followed by a blank line, as one token stream. Sample i is `length` tokens of
that stream from a seeded document start. Each sample is fed through the caches in
chunks (the chunked prefill of generation, so a long sample needs no more memory
than prefilling it), keeping the next-token loss of every position; logits are formed
`LOGIT_BLOCK` positions at a time. Positions are binned on a log2 scale ([0, 64),
[64, 128), ..., up to `length`); each bin reports the mean loss (nats per token) and
its perplexity over every sample. A flat or falling curve means the model still uses
the context at that distance; a rising one, that it stops.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hylo_jax.eval import corpus as corpus_lib

LOGIT_BLOCK = 256


def document_stream(tokenizer, corpus: str = "python_stdlib", split: str = "heldout", max_tokens: int | None = None):
    """(int32 token stream, start offset of each document) of `split` of `corpus`, sorted by name."""
    ids, starts = [], []
    n = 0
    for doc in corpus_lib.documents(corpus, split):
        starts.append(n)
        piece = tokenizer(doc.text.strip("\n") + "\n\n", add_special_tokens=False)["input_ids"]
        ids.append(np.asarray(piece, np.int32))
        n += len(piece)
        if max_tokens is not None and n >= max_tokens:
            break
    if not ids:
        raise ValueError(f"corpus {corpus!r} split {split!r} has no text on this machine")
    return np.concatenate(ids), np.asarray(starts)


def samples(stream: np.ndarray, starts: np.ndarray, length: int, n: int, seed: int) -> np.ndarray:
    """[n, length + 1] windows of the stream (the extra token is the last target), each
    from a seeded document start."""
    if len(stream) < length + 1:
        raise ValueError(f"the stream has {len(stream)} tokens; loss by position at {length} needs {length + 1}")
    ok = starts[starts + length + 1 <= len(stream)]
    rng = np.random.default_rng([seed, length])
    chosen = rng.choice(ok, size=n, replace=len(ok) < n)
    return np.stack([stream[s : s + length + 1] for s in chosen])


def bin_edges(length: int, first: int = 64) -> list[int]:
    edges = [0]
    while edges[-1] < length:
        edges.append(min(length, first if edges[-1] == 0 else 2 * edges[-1]))
    return edges


def _token_nll(model, h_btd, targets_bt):
    b, t, d = h_btd.shape
    pad = (-t) % LOGIT_BLOCK
    h = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, LOGIT_BLOCK, d).swapaxes(0, 1)
    tgt = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(b, -1, LOGIT_BLOCK).swapaxes(0, 1)

    def block(xs):
        logits = model.logits_from_hidden(xs[0])
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, xs[1][..., None], -1)[..., 0]

    return jax.lax.map(block, (h, tgt)).swapaxes(0, 1).reshape(b, -1)[:, :t]


@functools.partial(jax.jit, static_argnums=0, donate_argnums=5)
def _nll_chunk(graphdef, state, ids, targets, start, cache):
    model = nnx.merge(graphdef, state)
    b, t = ids.shape
    positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    h, cache, _ = model.model(ids, positions, None, cache)
    return _token_nll(model, h, targets), cache


def token_losses(model, windows: np.ndarray, *, chunk_size: int = 2048, cache_dtype=None) -> np.ndarray:
    """Next-token loss of every position: windows [B, T + 1] -> float32 [B, T]."""
    graphdef, state = nnx.split(model)
    b, t = windows.shape[0], windows.shape[1] - 1
    cache = model.init_cache(b, t, cache_dtype)
    out = []
    for lo in range(0, t, chunk_size):
        hi = min(lo + chunk_size, t)
        nll, cache = _nll_chunk(graphdef, state, jnp.asarray(windows[:, lo:hi]), jnp.asarray(windows[:, lo + 1 : hi + 1]),
                                jnp.int32(lo), cache)
        out.append(np.asarray(nll))
    return np.concatenate(out, axis=1)


def summarize(losses: np.ndarray) -> dict:
    """[N, T] token losses -> {"bins": [[lo, hi], ...], "loss", "ppl", "tokens"} per bin."""
    edges = bin_edges(losses.shape[1])
    bins = list(zip(edges[:-1], edges[1:]))
    loss = [float(losses[:, lo:hi].mean()) for lo, hi in bins]
    return {
        "bins": [list(b) for b in bins],
        "loss": loss,
        "ppl": [math.exp(x) for x in loss],
        "tokens": [int(losses[:, lo:hi].size) for lo, hi in bins],
    }
