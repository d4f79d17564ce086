"""Synthetic passkey task: exact prompt construction, answer extraction, and scoring
checked with models whose answers are known from how they work (an induction-copy
model that really reads the context, with and without a limited view), plus a tiny
random CausalLM decoded both with caches and by full recomputation."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hylo_jax.config import ModelConfig
from hylo_jax.convert.hub import load_tokenizer
from hylo_jax.eval import passkey
from hylo_jax.models.decoder import CausalLM


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("length", [96, 257, 1000])
def test_prompt_has_exact_length_and_the_needle(tokenizer, length):
    for depth in (0.0, 0.37, 1.0):
        p = passkey.build_prompt(tokenizer, length, "40917", depth)
        assert p.input_ids.dtype == np.int32 and len(p.input_ids) == length
        needle = tokenizer.decode(p.input_ids[p.needle_start : p.needle_end].tolist())
        assert needle == " The pass key is 40917. Remember it. 40917 is the pass key."
        text = tokenizer.decode(p.input_ids.tolist())
        assert text.startswith(passkey.INTRO) and text.endswith("\nWhat is the pass key? The pass key is")
        assert text.count("40917") == 2
        # Separately tokenised pieces join into what tokenising the text gives.
        assert _ids(tokenizer, text) == p.input_ids.tolist()
    intro, question = len(_ids(tokenizer, passkey.INTRO)), len(_ids(tokenizer, "\n" + passkey.QUESTION))
    assert passkey.build_prompt(tokenizer, length, "40917", 0.0).needle_start == intro
    # Depth 1: the last sentence boundary; only a cut sentence may follow the needle.
    longest = max(len(_ids(tokenizer, " " + s)) for s in passkey.FILLER_SENTENCES)
    assert 0 <= length - question - passkey.build_prompt(tokenizer, length, "40917", 1.0).needle_end < longest


def test_needle_depth_is_monotone_and_on_sentence_boundaries(tokenizer):
    prompts = [passkey.build_prompt(tokenizer, 600, "12345", d) for d in np.linspace(0, 1, 11)]
    starts = [p.needle_start for p in prompts]
    assert starts == sorted(starts) and len(set(starts)) > 5
    for p in prompts:
        assert tokenizer.decode(p.input_ids[: p.needle_start].tolist()).endswith(".")


def test_prompts_are_seeded(tokenizer):
    a = passkey.make_prompts(tokenizer, 200, 5, seed=3)
    b = passkey.make_prompts(tokenizer, 200, 5, seed=3)
    c = passkey.make_prompts(tokenizer, 200, 5, seed=4)
    assert [p.passkey for p in a] == [p.passkey for p in b] != [p.passkey for p in c]
    assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert all(len(p.passkey) == 5 and p.passkey.isdigit() for p in a)


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="too short; a passkey prompt needs at least"):
        passkey.build_prompt(tokenizer, 20, "12345", 0.5)
    with pytest.raises(ValueError, match="5 digits"):
        passkey.build_prompt(tokenizer, 200, "1234", 0.5)


def test_extract_answer():
    assert passkey.extract_answer(" 48213.") == "48213"
    assert passkey.extract_answer(" 48213 is the pass key") == "48213"
    assert passkey.extract_answer(" 4821.3") == "4821"
    assert passkey.extract_answer(" green. The sky") is None


class InductionCopy:
    """ids [B, T] -> logits [B, T, V] whose last row predicts the token that followed the
    longest earlier match of the sequence's suffix (a hand-written induction head).
    It only reads tokens before `horizon`, so a needle past it is invisible."""

    def __init__(self, vocab, horizon=None):
        self.vocab, self.horizon = vocab, horizon

    def __call__(self, ids):
        ids = np.asarray(ids)
        b, t = ids.shape
        logits = np.zeros((b, t, self.vocab), np.float32)
        for row in range(b):
            seq, best_len, best_next = ids[row], 0, 0
            limit = min(t - 1, self.horizon or t) - 1
            for j in range(limit):  # the suffix ending at j is followed by seq[j + 1]
                n = 0
                while n <= j and seq[j - n] == seq[t - 1 - n]:
                    n += 1
                if n > best_len:
                    best_len, best_next = n, seq[j + 1]
            logits[row, -1, best_next] = 1.0
        return jnp.asarray(logits)


def test_a_model_that_reads_the_context_scores_one(tokenizer):
    result = passkey.evaluate(InductionCopy(len(tokenizer)), tokenizer, 300, n_trials=4, seed=0, batch_size=2)
    assert result["accuracy"] == 1.0 and result["correct"] == 4
    assert all(t["generated"].startswith(" " + t["passkey"]) for t in result["trials"])


def test_scoring_counts_each_trial(tokenizer):
    # The model sees only the first half; needles at depth 0.1/0.3 lie inside it, at
    # 0.7/0.9 outside (checked below), so exactly those two trials must be correct.
    length, depths = 300, [0.1, 0.9, 0.3, 0.7]
    model = InductionCopy(len(tokenizer), horizon=length // 2)
    result = passkey.evaluate(model, tokenizer, length, n_trials=4, seed=1, depths=depths)
    prompts = passkey.make_prompts(tokenizer, length, 4, seed=1, depths=depths)
    visible = [p.needle_end <= length // 2 for p in prompts]
    assert visible == [True, False, True, False]
    assert [t["correct"] for t in result["trials"]] == visible
    assert result["accuracy"] == 0.5
    assert [t["answer"] for t in result["trials"]][1::2] == [None, None]


@pytest.mark.slow  # compiles generate's prefill and decode loop: minutes on a busy CPU
def test_cached_generation_and_recomputation_agree(tokenizer):
    config = ModelConfig(
        model_type="llama", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        tie_word_embeddings=True,
    )
    model = CausalLM(config, rngs=nnx.Rngs(0))
    cached = passkey.evaluate(model, tokenizer, 100, n_trials=2, seed=2, batch_size=2, prefill_chunk_size=64)
    recomputed = passkey.evaluate(lambda ids: model(ids), tokenizer, 100, n_trials=2, seed=2, batch_size=1)
    assert [t["generated"] for t in cached["trials"]] == [t["generated"] for t in recomputed["trials"]]
    assert cached["accuracy"] == recomputed["accuracy"]
    assert cached["n_trials"] == 2 and cached["length"] == 100
