"""Distillation losses: stage-1 layer alignment and stage-2+ end-to-end KL.

Stage 1 (layer alignment, HyLo / Zebra-Llama): every converted student layer is fed
the teacher's hidden state at its input, and is pulled towards the teacher's output
of that layer and the teacher's mixer output:
    loss = sum_layers  mean_tokens ||h_s - h_t||_2 + ||mixer_s - mixer_t||_2.
Layers are independent here, so the stage trains them all in parallel from one teacher
pass.

Stage 2+ (end to end): KL(teacher || student) of next-token distributions at
temperature T (scaled by T^2 so gradients keep their size when T changes), optionally
mixed with next-token cross-entropy, averaged over real tokens (the mask) of the whole
batch, never per sequence. The [B, T, vocab] logits are never materialised: the KL is
accumulated over sequence chunks of `kl_chunk` positions with `lax.scan`, each chunk's logits recomputed in
the backward pass (`jax.checkpoint`), so memory grows with B*T*D, not B*T*V.

Batches are dicts of [B, T] arrays: "input_ids", "positions", "segment_ids" and
"loss_mask" (1 where token t+1 is the next token of t's document, 0 at document ends
and padding); see hylo_jax/distill/data.py. Every loss is masked by loss_mask.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from hylo_jax.models.decoder import default_positions, layer_groups, run_layers

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _batch_parts(batch: Mapping[str, jax.Array]):
    ids = batch["input_ids"]
    mask = batch.get("loss_mask")
    mask = jnp.ones(ids.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return ids, batch.get("positions"), batch.get("segment_ids"), mask


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """L2 norm whose gradient is 0 (not NaN) where x == 0 (an exact copy of a layer)."""
    sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def aligned_layers(student_config, teacher_config) -> tuple[int, ...]:
    """Layers trained in stage 1: those whose mixer differs from the teacher's.

    A student with no converted layer (a perturbed copy of the teacher) aligns all.
    """
    if student_config.num_hidden_layers != teacher_config.num_hidden_layers:
        raise ValueError(
            f"student has {student_config.num_hidden_layers} layers, teacher "
            f"{teacher_config.num_hidden_layers}: layer alignment needs one-to-one layers"
        )
    changed = tuple(
        i for i, (s, t) in enumerate(zip(student_config.layer_types, teacher_config.layer_types)) if s != t
    )
    return changed or tuple(range(student_config.num_hidden_layers))


def _layer_call(layer: nnx.Module, h, positions, segment_ids, policy: str):
    """(h_out, mixer_out) of one decoder layer, rematerialised under `policy`."""
    if policy == "none":
        h_out, mixer_out, _ = layer(h, positions, segment_ids)
        return h_out, mixer_out
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose from {tuple(REMAT_POLICIES)}")
    graphdef, state = nnx.split(layer)

    def run(state, h, positions, segment_ids):
        h_out, mixer_out, _ = nnx.merge(graphdef, state)(h, positions, segment_ids)
        return h_out, mixer_out

    run = jax.checkpoint(run, policy=REMAT_POLICIES[policy])
    return run(state, h, positions, segment_ids)


def final_hidden(model: nnx.Module, input_ids, positions=None, segment_ids=None, remat: str = "none"):
    """Final-normed hidden states [B, T, D], each layer rematerialised under `remat`.

    Same computation as `CausalLM.hidden` (embed -> layers -> norm); with remat the
    backward pass keeps only each layer's input instead of all its activations.
    """
    if remat == "none":
        return model.hidden(input_ids, positions, segment_ids)
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose from {tuple(REMAT_POLICIES)}")
    if positions is None:
        positions = default_positions(input_ids, segment_ids)
    h = model.model.embed_tokens(input_ids)
    h, _, _ = run_layers(model.model.layers, h, positions, segment_ids, remat=True, remat_policy=REMAT_POLICIES[remat])
    return model.model.norm(h)


def layer_alignment_loss(
    student: nnx.Module,
    teacher: nnx.Module,
    batch: Mapping[str, jax.Array],
    *,
    layers: tuple[int, ...] | None = None,
    remat: str = "none",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage 1: sum over `layers` of masked-mean ||h_s - h_t|| + ||mixer_s - mixer_t||.

    Student layer i gets the teacher's hidden state entering layer i. Returns
    (loss, metrics) with per-layer terms under "align/h{i}" and "align/mixer{i}".
    """
    ids, positions, segment_ids, mask = _batch_parts(batch)
    if positions is None:
        positions = default_positions(ids, segment_ids)
    if layers is None:
        layers = aligned_layers(student.config, teacher.config)
    _, _, collected = teacher.model(ids, positions, segment_ids, collect=True)
    hs_t = [jax.lax.stop_gradient(h) for h in collected["hidden_states"]]
    mixers_t = [jax.lax.stop_gradient(m) for m in collected["mixer_outputs"]]
    n_tokens = jnp.maximum(mask.sum(), 1.0)

    # Aligned layers are independent (each starts from the teacher's hidden state), so
    # all alike layers, wherever they sit, run as one lax.map: one traced body per kind.
    outputs = {}
    for idx, graphdef, stacked in layer_groups([student.model.layers[i] for i in layers], consecutive=False):

        def one(xs, graphdef=graphdef):
            state, h_in = xs
            return _layer_call(nnx.merge(graphdef, state), h_in, positions, segment_ids, remat)

        h_out, mixer_out = jax.lax.map(one, (stacked, jnp.stack([hs_t[layers[n]] for n in idx])))
        outputs.update({layers[n]: (h_out[j], mixer_out[j]) for j, n in enumerate(idx)})

    loss = jnp.zeros((), jnp.float32)
    metrics = {}
    for i in layers:
        h_s, mixer_s = outputs[i]
        h_term = jnp.sum(safe_norm(h_s - hs_t[i + 1]) * mask) / n_tokens
        m_term = jnp.sum(safe_norm(mixer_s - mixers_t[i]) * mask) / n_tokens
        metrics[f"align/h{i}"] = h_term
        metrics[f"align/mixer{i}"] = m_term
        loss = loss + h_term + m_term
    metrics["loss"] = loss
    metrics["tokens"] = mask.sum()
    return loss, metrics


def next_token_targets(input_ids):
    """Token t's target is token t+1 (the data pipeline's loss_mask already marks where
    t+1 is the next token of the same document)."""
    return jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)


def chunked_kl_and_ce(
    student: nnx.Module,
    teacher: nnx.Module,
    h_s: jax.Array,
    h_t: jax.Array,
    mask: jax.Array,
    targets: jax.Array | None = None,
    target_mask: jax.Array | None = None,
    *,
    temperature: float = 1.0,
    kl_chunk: int = 512,
) -> dict[str, jax.Array]:
    """Sums over chunks of the sequence of KL(p_t || p_s) * mask (and CE * target_mask).

    h_s, h_t: final-normed hidden states [B, T, D]; the logits of one chunk
    [B, chunk, V] exist at a time, in the forward and (recomputed) backward pass.
    Returns {"kl_sum", "ce_sum", "tokens", "target_tokens", "top1_agree_sum"}.
    """
    b, t, d = h_s.shape
    chunk = min(kl_chunk, t)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    with_ce = targets is not None
    if targets is None:
        targets = jnp.zeros((b, t), jnp.int32)
        target_mask = jnp.zeros((b, t), jnp.float32)

    def to_chunks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((b, n_chunks, chunk) + x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    gs, state_s = nnx.split(student)
    gt, state_t = nnx.split(teacher)
    state_t = jax.lax.stop_gradient(state_t)

    @jax.checkpoint
    def chunk_terms(state_s, state_t, hs_c, ht_c, m_c, tgt_c, tm_c):
        zs = nnx.merge(gs, state_s).logits_from_hidden(hs_c) / temperature
        zt = nnx.merge(gt, state_t).logits_from_hidden(ht_c) / temperature
        logp_s = jax.nn.log_softmax(zs, axis=-1)
        logp_t = jax.nn.log_softmax(zt, axis=-1)
        kl_tok = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
        agree = (jnp.argmax(zs, -1) == jnp.argmax(zt, -1)).astype(jnp.float32)
        terms = {
            "kl_sum": jnp.sum(kl_tok * m_c),
            "top1_agree_sum": jnp.sum(agree * m_c),
        }
        if with_ce:
            # CE at temperature 1 on the student's own logits.
            logp_s1 = jax.nn.log_softmax(zs * temperature, axis=-1)
            nll = -jnp.take_along_axis(logp_s1, tgt_c[..., None], axis=-1)[..., 0]
            terms["ce_sum"] = jnp.sum(nll * tm_c)
        return terms

    def body(carry, xs):
        terms = chunk_terms(state_s, state_t, *xs)
        return jax.tree.map(jnp.add, carry, terms), None

    init = {"kl_sum": jnp.zeros((), jnp.float32), "top1_agree_sum": jnp.zeros((), jnp.float32)}
    if with_ce:
        init["ce_sum"] = jnp.zeros((), jnp.float32)
    xs = tuple(
        to_chunks(x)
        for x in (h_s, jax.lax.stop_gradient(h_t), mask, targets, target_mask.astype(jnp.float32))
    )
    sums, _ = jax.lax.scan(body, init, xs)
    sums["tokens"] = mask.sum()
    sums["target_tokens"] = target_mask.sum()
    return sums


def kl_distill_loss(
    student: nnx.Module,
    teacher: nnx.Module,
    batch: Mapping[str, jax.Array],
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    kl_chunk: int = 512,
    remat: str = "none",
) -> tuple[jax.Array, dict[str, Any]]:
    """Stage 2+: T^2 * KL(teacher || student) over real tokens (+ ce_weight * CE).

    loss = (1 - ce_weight) * T^2 * KL_mean + ce_weight * CE_mean, each a mean over the
    real tokens of the whole batch.
    """
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight={ce_weight} must be in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    ids, positions, segment_ids, mask = _batch_parts(batch)
    h_t = jax.lax.stop_gradient(teacher.hidden(ids, positions, segment_ids))
    h_s = final_hidden(student, ids, positions, segment_ids, remat)
    targets = target_mask = None
    if ce_weight > 0:
        targets, target_mask = next_token_targets(ids), mask
    sums = chunked_kl_and_ce(
        student, teacher, h_s, h_t, mask, targets, target_mask, temperature=temperature, kl_chunk=kl_chunk
    )
    n_tokens = jnp.maximum(sums["tokens"], 1.0)
    kl = sums["kl_sum"] / n_tokens
    loss = (1.0 - ce_weight) * temperature**2 * kl
    metrics = {"kl": kl, "top1_agree": sums["top1_agree_sum"] / n_tokens, "tokens": sums["tokens"]}
    if ce_weight > 0:
        ce = sums["ce_sum"] / jnp.maximum(sums["target_tokens"], 1.0)
        loss = loss + ce_weight * ce
        metrics["ce"] = ce
    metrics["loss"] = loss
    return loss, metrics
