"""Helpers shared by the linear-recurrence kernels (ssd, gated_delta_rule).

Padding the time axis to a multiple of the chunk, turning per-token segment ids
into a monotone segment index (so "same segment" is a plain equality even when a
document id comes back later in the row) and its per-chunk masks, and the choice
between interpret mode and compiled kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def pad_time(x: jax.Array, multiple: int, axis: int = 1, value=0) -> jax.Array:
    """Pad `axis` of x at the end up to a multiple of `multiple`."""
    t = x.shape[axis]
    pad = (-t) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def segment_index(segment_ids: jax.Array) -> jax.Array:
    """[B, T] ids -> [B, T] int32 index that starts at 0 and grows by one where the id changes.

    A state restarts exactly where the index grows, and two positions share a
    segment iff their indices are equal (ids need not be sorted or unique).
    """
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must be [batch, time], got shape {segment_ids.shape}")
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = jnp.concatenate([jnp.zeros((change.shape[0], 1), bool), change], axis=1)
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)


def pad_segments(seg: jax.Array, multiple: int) -> jax.Array:
    """Pad a [B, T] segment index by repeating its last value (padding joins the last
    segment, so it neither resets nor leaks a state)."""
    pad = (-seg.shape[1]) % multiple
    if pad == 0:
        return seg
    return jnp.pad(seg, ((0, 0), (0, pad)), mode="edge")


class ChunkSegments(NamedTuple):
    """Segment bookkeeping of a sequence padded to whole chunks: a position sees the state
    entering its chunk only if no segment starts between the chunk start and it, and a
    chunk passes its entering state on only if no segment starts inside it."""

    seg: jax.Array  # [B, Tp] int32 segment index; the padded tail belongs to the last segment
    carry_in: jax.Array  # [B, N, C] float32: 1 where a position sees the state entering its chunk
    carry_out: jax.Array  # [B, N, C] float32: 1 where it reaches the state leaving its chunk
    carry_across: jax.Array  # [B, N] float32: 1 where no segment starts inside the chunk


def chunk_segments(segment_ids, t, chunk_size) -> ChunkSegments:
    """`ChunkSegments` of segment_ids [B, T] (None: one segment) padded to a multiple of chunk_size."""
    c = chunk_size
    tp = t + (-t) % c
    if segment_ids is None:
        b = 1
        seg = jnp.zeros((1, tp), jnp.int32)
    else:
        b = segment_ids.shape[0]
        seg = pad_segments(segment_index(segment_ids), c)
    seg_c = seg.reshape(b, tp // c, c)
    # Segment of the token just before each chunk (chunk 0 continues the initial state).
    seg_prev = jnp.concatenate([seg[:, :1], seg[:, c - 1 : tp - 1 : c]], axis=1)  # [B, N]
    return ChunkSegments(
        seg,
        (seg_c == seg_prev[..., None]).astype(jnp.float32),
        (seg_c == seg_c[..., -1:]).astype(jnp.float32),
        (seg_c[..., -1] == seg_prev).astype(jnp.float32),
    )


def default_interpret(interpret: bool | None) -> bool:
    """interpret=None means: interpret on CPU, compile on an accelerator."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)
