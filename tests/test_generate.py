"""Generation: seeded sampling inside the compiled decode loop, the top-k/top-p filters
against their definition, greedy limits, EOS, equal-length grouping, streaming, the
chat template and special ids of a checkpoint, the prefill's memory, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hylo_jax.config import ModelConfig
from hylo_jax.inference import generate, generation_defaults, memory
from hylo_jax.inference import generation as gen_lib
from hylo_jax.inference import text as text_lib
from hylo_jax.models import CausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64


def _model(vocab=VOCAB, seed=0):
    config = ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
    )
    model = CausalLM(config, rngs=nnx.Rngs(seed))
    # An untied, larger lm_head: peaked next-token distributions that change with the
    # context (tied random embeddings make every greedy step repeat the last token).
    kernel = model.lm_head.kernel
    kernel.set_value(kernel.get_value() * 8.0)
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def prompts():
    return np.random.default_rng(1).integers(0, VOCAB, (2, 9)).astype(np.int32)


def test_sampling_is_seeded_and_independent_of_the_block_size(model, prompts):
    a = generate(model, prompts, 9, temperature=1.0, seed=3, decode_block=4).tokens
    b = generate(model, prompts, 9, temperature=1.0, seed=3, decode_block=8).tokens
    c = generate(model, prompts, 9, temperature=1.0, seed=4, decode_block=4).tokens
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert a.shape == (2, 9) and a.dtype == np.int32


def test_greedy_limits(model, prompts):
    greedy = generate(model, prompts, 9, decode_block=4).tokens
    assert (greedy != greedy[:, :1]).any()  # not one repeated token: the checks below mean something
    np.testing.assert_array_equal(generate(model, prompts, 9, temperature=1e-4, decode_block=4).tokens, greedy)
    np.testing.assert_array_equal(generate(model, prompts, 9, temperature=1.0, top_k=1, decode_block=4).tokens, greedy)


def test_top_k_and_top_p_sample_from_their_definitions():
    probs = np.array([0.5, 0.3, 0.12, 0.08])
    logits = jnp.asarray(np.broadcast_to(np.log(probs), (20000, 4)), jnp.float32)
    key = jax.random.key(0)

    def freq(sampler, top_p=1.0):
        tokens = np.asarray(gen_lib.sample_next(logits, key, sampler, jnp.float32(1.0), jnp.float32(top_p)))
        return np.bincount(tokens, minlength=4) / len(tokens)

    # top_p 0.7: the smallest prefix reaching 0.7 is {0, 1}, renormalised.
    np.testing.assert_allclose(freq(gen_lib.sampler_for(1.0, 0, 0.7), 0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
    np.testing.assert_allclose(freq(gen_lib.sampler_for(1.0, 3, 1.0)), [0.5 / 0.92, 0.3 / 0.92, 0.12 / 0.92, 0], atol=0.015)
    np.testing.assert_allclose(freq(gen_lib.sampler_for(1.0, 0, 1.0)), probs, atol=0.015)
    # temperature 0.5 squares the probabilities before renormalising
    t = np.asarray(gen_lib.sample_next(logits, key, gen_lib.sampler_for(0.5, 0, 1.0), jnp.float32(0.5), jnp.float32(1.0)))
    np.testing.assert_allclose(np.bincount(t, minlength=4) / len(t), probs**2 / (probs**2).sum(), atol=0.015)


def test_eos_stops_a_row_and_pads_it(model, prompts):
    free = generate(model, prompts, 9, decode_block=4).tokens
    eos = next(int(t) for t in free[0, 2:] if t not in free[1])  # ends row 0 only
    first = int(np.argmax(free[0] == eos))
    out = generate(model, prompts, 9, eos_token_id=eos, pad_token_id=VOCAB - 1, decode_block=4)
    np.testing.assert_array_equal(out.tokens[0, : first + 1], free[0, : first + 1])
    assert (out.tokens[0, first + 1 :] == VOCAB - 1).all()
    np.testing.assert_array_equal(out.tokens[1], free[1])
    assert out.num_tokens.tolist() == [first + 1, 9]


def test_prompts_of_different_lengths_equal_each_alone(model):
    rng = np.random.default_rng(1)
    ps = [rng.integers(0, VOCAB, n).astype(np.int32) for n in (9, 6, 9)]
    together = generate(model, ps, 9, decode_block=4).tokens
    for i, p in enumerate(ps):
        np.testing.assert_array_equal(together[i], generate(model, p, 9, decode_block=4).tokens[0])


def test_streamed_blocks_are_the_tokens(model, prompts):
    seen = []
    out = generate(model, prompts, 8, decode_block=4, stream=lambda rows, toks: seen.append((rows, toks)))
    assert [rows for rows, _ in seen] == [[0, 1]] * len(seen)
    np.testing.assert_array_equal(np.concatenate([t for _, t in seen], axis=1), out.tokens)
    assert [t.shape[1] for _, t in seen] == [1, 4, 3]


def test_prefill_holds_no_sequence_logits():
    """XLA's scratch memory for a prefill step of T tokens grows with the vocabulary by
    a few rows, not by T rows: only the last position's logits are formed."""
    t, acts = 512, {}
    for vocab in (4096, 32768):
        config = ModelConfig(
            model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
        )
        mem = memory.compiled_prefill_memory(memory.abstract_model(config), 1, t, t)
        assert mem.cache == 2 * (2 * t * 2 * 8 * 4 + 4)  # layers x ((k, v) x slots x kv heads x dim x f32 + index)
        acts[vocab] = mem.activations
    assert acts[32768] - acts[4096] < 8 * (32768 - 4096) * 4


@pytest.fixture(scope="module")
def tokenizer():
    return text_lib.load_tokenizer()


def test_chat_template_is_applied_when_present(tokenizer):
    model = _model(vocab=len(tokenizer))
    out = generate(model, "Hello there", 2, tokenizer=tokenizer)
    want = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert out.prompt_ids[0].tolist() == list(want)
    assert tokenizer.decode(out.prompt_ids[0].tolist()).endswith("<|im_start|>assistant\n")
    plain = generate(model, "Hello there", 2, tokenizer=tokenizer, chat_template=False)
    assert plain.prompt_ids[0].tolist() == tokenizer("Hello there")["input_ids"]
    assert isinstance(out.texts[0], str)
    # A tokenizer without a template gets the plain text.
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        assert generate(model, "Hello there", 2, tokenizer=tokenizer).prompt_ids[0].tolist() == plain.prompt_ids[0].tolist()
    finally:
        tokenizer.chat_template = saved


def test_stream_decoder_rebuilds_the_text(tokenizer):
    ids = tokenizer("Grüße — ünïcödé text, 数字 42.", add_special_tokens=False)["input_ids"]
    dec = text_lib.StreamDecoder(tokenizer)
    pieces = [dec.push(ids[i : i + 2]) for i in range(0, len(ids), 2)]
    assert "".join(pieces) == tokenizer.decode(ids)


def test_generation_defaults_from_the_checkpoint(tmp_path, tokenizer):
    gguf = generation_defaults(None, tokenizer)  # the default teacher's GGUF: <|im_end|> for both
    assert gguf.eos_token_id == (2,) and gguf.pad_token_id == 2
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5, "pad_token_id": None}))
    assert generation_defaults(str(tmp_path)) == text_lib.GenerationDefaults((5,), 5)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9], "pad_token_id": 0}))
    assert generation_defaults(str(tmp_path)) == text_lib.GenerationDefaults((7, 9), 0)
    (tmp_path / "config.json").write_text(json.dumps({}))
    (tmp_path / "generation_config.json").write_text(json.dumps({}))
    assert generation_defaults(str(tmp_path), tokenizer) == text_lib.GenerationDefaults((2,), 2)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1, 2], 0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1, 2], 2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, "text", 2)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [np.zeros(0, np.int32)], 2)


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "hylo_jax.generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_help_lists_every_field_and_rejects_unknown_ones():
    from hylo_jax.config_files import load_config

    res = _cli("--help")
    assert res.returncode == 0
    for field in load_config("generate").keys():
        assert f"{field}:" in res.stdout
    bad = _cli("--config.temprature=1")
    assert bad.returncode != 0 and "temprature" in bad.stderr
