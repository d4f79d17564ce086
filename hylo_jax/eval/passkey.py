"""Synthetic passkey retrieval (needle in a haystack) at a chosen context length.

The prompt, built directly in tokens so its length is exact:

    <intro> <filler sentences ...> <needle: "The pass key is 48213. Remember it.
    48213 is the pass key."> <filler ...>\\nWhat is the pass key? The pass key is

The filler is the repeated "The grass is green. The sky is blue. ..." text of the
passkey task of Mohtashami & Jaggi (2023, "Landmark Attention"); the needle sits at
a sentence boundary nearest to a seeded random depth in [0, 1] of the filler.
This is a synthetic test (no real text), used to check long-context retrieval of
teacher and student alike.

Scoring is real greedy decoding (hylo_jax.eval.predict): a few new tokens are
generated, decoded to text, and the first run of digits in it must equal the passkey.
`Passkey` is this task in the evaluation suite (`python -m hylo_jax.eval`, task
"passkey"); `evaluate` is the call the distillation loop makes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from hylo_jax.eval.tasks import Sample, Task

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


class Passkey(Task):
    """The passkey prompt above as a task of the suite (hylo_jax.eval.tasks): the
    synthetic filler, no chat template, scored by the first number generated."""

    name = "passkey"
    max_new_tokens = 8

    def build(self, env, length, rng, depth):
        key = str(int(rng.integers(10_000, 100_000)))
        return as_sample(env.tokenizer, build_prompt(env.tokenizer, length, key, depth))

    def score(self, prediction: str, sample) -> float:
        return float(extract_answer(prediction) == sample.answers[0])


def as_sample(tokenizer, prompt: PasskeyPrompt) -> Sample:
    intro, question = len(_ids(tokenizer, INTRO)), len(_ids(tokenizer, "\n" + QUESTION))
    return Sample(prompt.input_ids, (prompt.passkey,), prompt.depth, (intro, len(prompt.input_ids) - question))


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
    """Passkey accuracy of `model` over `n_trials` prompts of exactly `length` tokens
    (`make_prompts`: same seed, same prompts, for any model); `model` is a CausalLM or
    any ids -> logits callable (hylo_jax.eval.predict).

    -> {"accuracy", "correct", "n_trials", "length", "trials": [{"passkey", "depth",
    "answer", "generated", "correct"}]}.
    """
    from hylo_jax.eval.predict import predictor, run_samples

    samples = [as_sample(tokenizer, p) for p in make_prompts(tokenizer, length, n_trials, seed, depths)]
    # No EOS: the number is read from a fixed number of tokens, as before the suite.
    predict = predictor(model, tokenizer, batch_size=batch_size, prefill_chunk_size=prefill_chunk_size, eos_token_id=())
    result = run_samples(Passkey(), predict, samples)
    trials = [
        {"passkey": s.answers[0], "depth": s.depth, "answer": extract_answer(r["prediction"]),
         "generated": r["prediction"], "correct": bool(r["score"])}
        for s, r in zip(samples, result["records"])
    ]
    correct = sum(t["correct"] for t in trials)
    return {"accuracy": correct / n_trials, "correct": correct, "n_trials": n_trials, "length": length, "trials": trials}
