"""Generation with caches: chunked prefill, then compiled decode blocks with sampling.

    out = generate(model, "Why is the sky blue?", tokenizer=tok, max_new_tokens=64,
                   temperature=0.7, top_p=0.9, seed=1, stream=print_tokens)
    out.texts[0], out.tokens [N, max_new_tokens], out.num_tokens [N]

Prefill feeds the prompt `prefill_chunk_size` tokens at a time into the caches and
keeps only the last position's logits (computed from the last hidden state alone),
so its memory is the weights, the caches (KV for attention/MLA, constant states for
the linear mixers) and one chunk's activations: never [T, vocab] logits, and never
more attention scores than chunk x cache length.

Decoding runs `decode_block` tokens per compiled call (a `lax.fori_loop` that feeds
each token, samples the next one and tracks which rows have ended); between blocks
the host streams the new tokens and stops once every row has emitted an EOS. Sampling
(temperature, top-k, top-p) happens inside the loop; token j of a row is drawn with
`fold_in(key(seed), j)`, so the result does not depend on the block size.

The model is split into (graphdef, state) once; a generation compiles one prefill
chunk shape (two when the prompt is not a multiple of the chunk) and one decode
block per batch shape and cache length.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from hylo_jax.inference import text as text_lib


class Sampler(NamedTuple):
    """The compile-time part of the sampling settings (the rest are traced scalars)."""

    greedy: bool
    top_k: int  # 0: no top-k filter
    top_p: bool  # whether the nucleus (top-p) filter is on


def sampler_for(temperature: float, top_k: int, top_p: float) -> Sampler:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off)")
    return Sampler(greedy=temperature == 0.0, top_k=top_k, top_p=top_p < 1.0)


def sample_next(logits_bv, key, sampler: Sampler, temperature, top_p) -> jax.Array:
    """One token per row from float32 logits [B, V] -> int32 [B]."""
    if sampler.greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv / temperature
    if not (sampler.top_k or sampler.top_p):
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    # Candidates in descending order: the k best, or all of them for top-p alone.
    vals, idx = jax.lax.top_k(logits, sampler.top_k or logits.shape[-1])
    if sampler.top_p:
        probs = jax.nn.softmax(vals, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always).
        before = jnp.cumsum(probs, axis=-1) - probs
        vals = jnp.where(before < top_p, vals, -jnp.inf)
    choice = jax.random.categorical(key, vals, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _forward_last(model, input_ids, start, cache):
    """Feeds a chunk at positions start.. -> (logits of its last position [B, V], cache)."""
    b, t = input_ids.shape
    positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    h, cache, _ = model.model(input_ids, positions, None, cache)
    return model.logits_from_hidden(h[:, -1]), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def prefill_chunk(graphdef, state, input_ids, start, cache):
    """One prefill step of `prefill` (exposed for the memory analysis in tools/bench)."""
    return _forward_last(nnx.merge(graphdef, state), input_ids, start, cache)


def prefill(model, input_ids, cache, *, start: int = 0, chunk_size: int | None = None, progress: bool = False):
    """Feeds input_ids [B, T] at positions start.. into `cache`, `chunk_size` tokens
    per compiled step (all at once when None).
    -> (float32 logits of the last position [B, V], cache)."""
    graphdef, state = nnx.split(model)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    t = input_ids.shape[1]
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"prefill chunk_size={chunk_size} must be >= 1")
    chunk_size = min(chunk_size or t, t)
    logits = None
    starts = range(0, t, chunk_size)
    for lo in tqdm(starts, desc="prefill", unit="chunk", disable=not progress or len(starts) < 2):
        logits, cache = prefill_chunk(graphdef, state, input_ids[:, lo : lo + chunk_size], jnp.int32(start + lo), cache)
    return logits, cache


@functools.partial(jax.jit, static_argnames="sampler")
def _sample_first(logits, key, temperature, top_p, *, sampler):
    return sample_next(logits, jax.random.fold_in(key, 0), sampler, temperature, top_p)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps", "sampler"), donate_argnames="cache")
def _decode_block(graphdef, state, token, cache, index, position, done, key, temperature, top_p, eos_ids, pad_id, *,
                  num_steps, sampler):
    """Feeds `token` [B] at `position` and samples num_steps tokens (generation indices
    index, index + 1, ...). -> (tokens [B, num_steps], cache, done [B])."""
    model = nnx.merge(graphdef, state)

    def body(i, carry):
        token, cache, done, out = carry
        logits, cache = _forward_last(model, token[:, None], position + i, cache)
        nxt = sample_next(logits, jax.random.fold_in(key, index + i), sampler, temperature, top_p)
        nxt = jnp.where(done, pad_id, nxt)
        done = done | jnp.isin(nxt, eos_ids)
        return nxt, cache, done, out.at[:, i].set(nxt)

    out = jnp.zeros((token.shape[0], num_steps), jnp.int32)
    _, cache, done, out = jax.lax.fori_loop(0, num_steps, body, (token, cache, done, out))
    return out, cache, done


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: np.ndarray  # int32 [N, max_new_tokens]; after a row's EOS: pad_token_id
    num_tokens: np.ndarray  # int32 [N]: new tokens of each row up to and including its EOS
    prompt_ids: list  # the N prompts as int32 arrays (after the chat template)
    texts: list | None  # each row's new tokens decoded (special tokens dropped), with a tokenizer


def _prompts_as_ids(prompts, tokenizer, chat_template: bool, system_prompt: str | None) -> list[np.ndarray]:
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, (np.ndarray, jax.Array)) or (
        isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (int, np.integer))
    ):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"prompt ids must be an int array [batch, time] or [time], got {arr.dtype} {arr.shape}")
        prompts = list(arr)
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer (tokenizer=hylo_jax.inference.load_tokenizer(path))")
            p = text_lib.encode(tokenizer, p, chat_template=chat_template, system_prompt=system_prompt)
        p = np.asarray(p, np.int32)
        if p.ndim != 1 or p.size == 0:
            raise ValueError(f"each prompt must be a non-empty 1-D list of ids, got shape {p.shape}")
        out.append(p)
    if not out:
        raise ValueError("no prompts given")
    return out


def generate(
    model,
    prompts,
    max_new_tokens: int = 64,
    *,
    tokenizer=None,
    chat_template: bool = True,
    system_prompt: str | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    prefill_chunk_size: int | None = None,
    decode_block: int = 16,
    batch_size: int | None = None,
    cache_dtype=None,
    stream: Callable[[list[int], np.ndarray], None] | None = None,
) -> Generation:
    """Generates `max_new_tokens` tokens after each prompt.

    prompts: a text, a list of texts (needs `tokenizer`; each is put in the tokenizer's
      chat template as the user's message when `chat_template` and the tokenizer has
      one), or token ids: [T], [B, T] or a list of 1-D id sequences.
    Prompts of different lengths are not padded together yet: prompts of equal length
      run as one batch (at most `batch_size` rows), the others group by group, and the
      results come back in the order given. (Left padding needs the attention op that
      takes per-row start positions; the API already takes the list.)
    temperature 0 is greedy (as are top_k 1 and a tiny temperature); else tokens are sampled from softmax(logits /
      temperature) restricted to the top_k best (0: all) and to the smallest set whose
      probability reaches top_p (1: all), with `seed`.
    eos_token_id: id(s) that end a row (None: the tokenizer's EOS if a tokenizer is
      given, else none); the rest of an ended row is `pad_token_id` (default the first
      EOS). The CLI takes both from the checkpoint (`text.generation_defaults`).
    stream(rows, tokens [len(rows), k]) is called with each block of new tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if decode_block < 1:
        raise ValueError(f"decode_block={decode_block} must be >= 1")
    sampler = sampler_for(temperature, top_k, top_p)
    ids = _prompts_as_ids(prompts, tokenizer, chat_template, system_prompt)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    eos = text_lib.as_ids(eos_token_id)
    pad = int(pad_token_id if pad_token_id is not None else (eos[0] if eos else 0))
    tokens = np.full((len(ids), max_new_tokens), pad, np.int32)

    groups: dict[int, list[int]] = {}
    for i, p in enumerate(ids):
        groups.setdefault(len(p), []).append(i)
    for rows in groups.values():
        step = batch_size or len(rows)
        for lo in range(0, len(rows), step):
            batch = rows[lo : lo + step]
            on_block = None if stream is None else functools.partial(stream, batch)
            tokens[batch] = _generate_batch(
                model, np.stack([ids[i] for i in batch]), max_new_tokens, sampler=sampler,
                temperature=temperature, top_p=top_p, seed=seed, eos=eos, pad=pad,
                prefill_chunk_size=prefill_chunk_size, decode_block=min(decode_block, max(max_new_tokens - 1, 1)),
                cache_dtype=cache_dtype, on_block=on_block,
            )
    is_eos = np.isin(tokens, eos) if eos else np.zeros(tokens.shape, bool)
    num = np.where(is_eos.any(1), is_eos.argmax(1) + 1, max_new_tokens).astype(np.int32)
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(tokens, num)]
    return Generation(tokens, num, ids, texts)


def _generate_batch(model, ids, max_new_tokens, *, sampler, temperature, top_p, seed, eos, pad,
                    prefill_chunk_size, decode_block, cache_dtype, on_block) -> np.ndarray:
    b, t = ids.shape
    n_blocks = math.ceil((max_new_tokens - 1) / decode_block)
    cache = model.init_cache(b, t + n_blocks * decode_block, cache_dtype)
    logits, cache = prefill(model, ids, cache, chunk_size=prefill_chunk_size)
    key = jax.random.key(seed)
    temperature, top_p = jnp.float32(max(temperature, 1e-30)), jnp.float32(top_p)
    eos_ids = jnp.asarray(eos or (-1,), jnp.int32)
    token = _sample_first(logits, key, temperature, top_p, sampler=sampler)
    done = jnp.isin(token, eos_ids)
    blocks = [np.asarray(token)[:, None]]
    if on_block is not None:
        on_block(blocks[-1])
    graphdef, state = nnx.split(model)
    index = 1
    while index < max_new_tokens and not bool(done.all()):
        out, cache, done = _decode_block(
            graphdef, state, token, cache, jnp.int32(index), jnp.int32(t + index - 1), done, key, temperature,
            top_p, eos_ids, jnp.int32(pad), num_steps=decode_block, sampler=sampler,
        )
        token = out[:, -1]
        blocks.append(np.asarray(out)[:, : max_new_tokens - index])
        if on_block is not None:
            on_block(blocks[-1])
        index += decode_block
    out = np.concatenate(blocks, axis=1)
    return np.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])), constant_values=pad)
