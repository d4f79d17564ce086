"""Synthetic passkey retrieval (needle in a haystack) at a chosen context length.

The prompt, built directly in tokens so its length is exact:

    <intro> <filler sentences ...> <needle: "The pass key is 48213. Remember it.
    48213 is the pass key."> <filler ...>\\nWhat is the pass key? The pass key is

The filler is the repeated "The grass is green. The sky is blue. ..." text of the
passkey task of Mohtashami & Jaggi (2023, "Landmark Attention"); the needle sits at
a sentence boundary nearest to a seeded random depth in [0, 1] of the filler.
This is a synthetic test (no real text), used to check long-context retrieval of
teacher and student alike.

Scoring is real greedy decoding: `num_answer_tokens` new tokens are generated
(with hylo_jax.inference.generate and its caches when the model has `init_cache`
/ `step`, as CausalLM does; otherwise by re-running the model on the growing
sequence and taking the argmax of the last position), decoded to text, and the
first run of digits in it must equal the passkey.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    input_ids: np.ndarray  # int32 [length]
    passkey: str  # the 5 digits
    depth: float  # requested relative depth of the needle in the filler
    needle_start: int  # token span of the needle sentence(s) in input_ids
    needle_end: int


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(tokenizer, length: int, passkey: str, depth: float) -> PasskeyPrompt:
    """A prompt of exactly `length` tokens with `passkey` at relative `depth`.

    Pieces are tokenised separately, each starting with a space (or newline), so
    their concatenation is what tokenising the whole text gives.
    """
    if not (len(passkey) == 5 and passkey.isdigit()):
        raise ValueError(f"passkey must be 5 digits, got {passkey!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    intro = _ids(tokenizer, INTRO)
    needle = _ids(tokenizer, " " + NEEDLE.format(key=passkey))
    question = _ids(tokenizer, "\n" + QUESTION)
    sentences = [_ids(tokenizer, " " + s) for s in FILLER_SENTENCES]
    n_filler = length - len(intro) - len(needle) - len(question)
    if n_filler < 0:
        raise ValueError(f"length={length} is too short; a passkey prompt needs at least {length - n_filler} tokens")
    # Cycle through the filler sentences until the haystack is full; the last one
    # may be cut (at a token boundary, so the length stays exact).
    filler, boundaries, i = [], [0], 0
    while len(filler) < n_filler:
        filler += sentences[i % len(sentences)]
        boundaries.append(len(filler))
        i += 1
    filler = filler[:n_filler]
    boundaries = [b for b in boundaries if b <= n_filler]
    cut = min(boundaries, key=lambda b: abs(b - depth * n_filler))
    ids = intro + filler[:cut] + needle + filler[cut:] + question
    start = len(intro) + cut
    return PasskeyPrompt(np.asarray(ids, np.int32), passkey, depth, start, start + len(needle))


def make_prompts(
    tokenizer, length: int, n: int, seed: int, depths: Sequence[float] | None = None
) -> list[PasskeyPrompt]:
    """`n` prompts with seeded random 5-digit passkeys; depths seeded uniform in
    [0, 1] unless given (then cycled)."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(10_000, 100_000, size=n)
    ds = rng.uniform(0.0, 1.0, size=n) if depths is None else [depths[i % len(depths)] for i in range(n)]
    return [build_prompt(tokenizer, length, str(k), float(d)) for k, d in zip(keys, ds)]


def extract_answer(text: str) -> str | None:
    """The first run of digits in the generated text (None if there is none)."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def greedy_continuation(model, input_ids: np.ndarray, num_tokens: int, *, prefill_chunk_size: int | None = None) -> np.ndarray:
    """Greedy-decodes `num_tokens` new tokens after input_ids [B, T] -> int32 [B, num_tokens].

    A model with `init_cache`/`step` (CausalLM) decodes with caches through
    hylo_jax.inference.generate; any other callable ids [B, T] -> logits [B, T, V]
    is re-run on the whole sequence for each new token.
    """
    input_ids = np.asarray(input_ids, np.int32)
    if hasattr(model, "init_cache") and hasattr(model, "step"):
        from hylo_jax.inference import generate

        return generate(model, input_ids, num_tokens, prefill_chunk_size=prefill_chunk_size).tokens
    ids = input_ids
    for _ in range(num_tokens):
        logits = model(jnp.asarray(ids))[:, -1]
        nxt = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    return ids[:, input_ids.shape[1] :]


def evaluate(
    model: Callable,
    tokenizer,
    length: int,
    *,
    n_trials: int = 20,
    seed: int = 0,
    batch_size: int = 1,
    depths: Sequence[float] | None = None,
    prefill_chunk_size: int | None = None,
) -> dict:
    """Passkey accuracy of `model` over `n_trials` prompts of exactly `length` tokens.

    -> {"accuracy", "correct", "n_trials", "length", "trials": [{"passkey", "depth",
    "answer", "generated", "correct"}]}. Same seed, same prompts, for any model.
    """
    prompts = make_prompts(tokenizer, length, n_trials, seed, depths)
    # Room for " 12345." however the model spaces it; only the first digit run counts.
    num_tokens = len(_ids(tokenizer, " " + prompts[0].passkey + ".")) + 1
    trials = []
    for lo in range(0, n_trials, batch_size):
        chunk = prompts[lo : lo + batch_size]
        new = greedy_continuation(model, np.stack([p.input_ids for p in chunk]), num_tokens, prefill_chunk_size=prefill_chunk_size)
        for p, row in zip(chunk, new):
            text = tokenizer.decode(row.tolist(), skip_special_tokens=True)
            answer = extract_answer(text)
            trials.append(
                {"passkey": p.passkey, "depth": p.depth, "answer": answer, "generated": text, "correct": answer == p.passkey}
            )
    correct = sum(t["correct"] for t in trials)
    return {"accuracy": correct / n_trials, "correct": correct, "n_trials": n_trials, "length": length, "trials": trials}
