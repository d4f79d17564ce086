"""The evaluation suite: every task's prompts have the exact length and carry their
answer only in the context, a perfect oracle scores 1 and a model that ignores the
context scores 0, samples are deterministic, scoring follows RULER's rule on whole
words, loss by position against a direct computation, and the suite's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from hylo_jax.config import ModelConfig
from hylo_jax.eval import corpus, long_loss, prompts, tasks
from hylo_jax.eval.predict import run_samples
from hylo_jax.inference.text import load_tokenizer
from hylo_jax.models import CausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 700


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def env(tokenizer):
    haystack = prompts.Haystack(tokenizer, [d.text for d in corpus.documents("pydoc_topics", "heldout")], "pydoc heldout")
    code = tasks.CodePool(tokenizer, corpus.documents("python_stdlib", "heldout")[:12], "12 held-out modules")
    return tasks.TaskEnv(tokenizer, haystack=haystack, code=code)


@pytest.fixture(scope="module")
def samples(env):
    return {name: tasks.get_task(name).samples(env, LENGTH, 4, seed=0) for name in tasks.TASKS}


def oracle(batch, max_new_tokens):
    """Reads the answer from the ground truth."""
    return [" " + ", ".join(s.answers) + "." for s in batch]


def ignores_context(tokenizer):
    """Answers from the prompt with its context cut out: it echoes the frame (question,
    key, instructions), which must not give the answer away."""

    def predict(batch, max_new_tokens):
        return [tokenizer.decode(np.concatenate([s.input_ids[: s.context[0]], s.input_ids[s.context[1] :]]).tolist())
                for s in batch]

    return predict


@pytest.mark.parametrize("name", tasks.TASKS)
def test_oracle_scores_one_and_ignoring_the_context_scores_zero(name, samples, tokenizer):
    task = tasks.get_task(name)
    assert run_samples(task, oracle, samples[name])["accuracy"] == 1.0
    assert run_samples(task, ignores_context(tokenizer), samples[name])["accuracy"] == 0.0


@pytest.mark.parametrize("name", tasks.TASKS)
def test_prompts_have_the_exact_length_and_the_answers_in_the_context(name, samples, tokenizer):
    chat = tokenizer.decode(samples[name][0].input_ids.tolist()).startswith("<|im_start|>system\n")
    assert chat == (name != "passkey")  # the chat template frames every task but the original passkey
    for s in samples[name]:
        assert s.input_ids.dtype == np.int32 and len(s.input_ids) == LENGTH
        lo, hi = s.context
        context = tokenizer.decode(s.input_ids[lo:hi].tolist())
        frame = tokenizer.decode(np.concatenate([s.input_ids[:lo], s.input_ids[hi:]]).tolist())
        for answer in s.answers:
            assert tasks.found(answer, context) and not tasks.found(answer, frame), (name, answer)


def test_samples_are_deterministic_and_depths_cover_the_context(env):
    task = tasks.get_task("niah_single_number")
    a, b = task.samples(env, LENGTH, 5, seed=1), task.samples(env, LENGTH, 5, seed=1)
    c = task.samples(env, LENGTH, 5, seed=2)
    assert all(np.array_equal(x.input_ids, y.input_ids) and x.answers == y.answers for x, y in zip(a, b))
    assert [x.answers for x in a] != [x.answers for x in c]
    depths = [s.depth for s in task.samples(env, LENGTH, 10, seed=0)]
    assert all(i / 10 <= d < (i + 1) / 10 for i, d in enumerate(depths))


def test_needles_sit_at_line_starts_near_their_depth(env, tokenizer):
    task = tasks.get_task("niah_single_number")
    for s in task.samples(env, 1500, 6, seed=3):
        lo, hi = s.context
        text = tokenizer.decode(s.input_ids[lo:hi].tolist())
        line = f"is: {s.answers[0]}.\n"
        at = text.index(line)
        start = text.rfind("\n", 0, at) + 1
        assert text[start:].startswith("One of the special magic numbers for ")
        assert abs(start / len(text) - s.depth) < 0.15  # nearest line start, in characters not tokens


def test_haystack_is_real_text_that_differs_per_sample(env, tokenizer):
    a, b = tasks.get_task("niah_single_word").samples(env, LENGTH, 2, seed=0)
    ta, tb = (tokenizer.decode(s.input_ids[s.context[0] : s.context[1]].tolist()) for s in (a, b))
    assert ta != tb
    heldout = "".join(d.text for d in corpus.documents("pydoc_topics", "heldout"))
    first_line = ta.strip().splitlines()[0]
    assert first_line in heldout


def test_cwe_counts(samples, tokenizer):
    for s in samples["cwe"]:
        lo, hi = s.context
        words = [line.split(". ", 1)[1] for line in tokenizer.decode(s.input_ids[lo:hi].tolist()).splitlines() if ". " in line]
        counts = {w: words.count(w) for w in set(words)}
        top = sorted(counts.values())[-10:]
        assert {counts[a] for a in s.answers} == {min(top)}
        assert max(c for w, c in counts.items() if w not in s.answers) < min(top)


def test_scoring_is_ruler_string_match_on_whole_words(env):
    sample = tasks.Sample(np.zeros(3, np.int32), ("1234567", "Apple"), 0.5, (0, 1))
    task = tasks.Task()
    assert task.score("The numbers are 1234567 and apple.", sample) == 1.0
    assert task.score("1234567", sample) == 0.5
    assert task.score("12345678, pineapple", sample) == 0.0
    passkey = tasks.get_task("passkey")
    key = tasks.Sample(np.zeros(3, np.int32), ("48213",), 0.5, (0, 1))
    assert passkey.score(" 48213.", key) == 1.0 and passkey.score(" 4821 48213", key) == 0.0


def test_bad_lengths_and_tasks(env):
    with pytest.raises(ValueError, match="too short"):
        tasks.get_task("niah_multiquery").samples(env, 60, 1, seed=0)
    with pytest.raises(ValueError, match="needs more text than the haystack"):
        tasks.get_task("niah_single_number").samples(env, 10**6, 1, seed=0)
    with pytest.raises(ValueError, match="unknown task 'niah'"):
        tasks.get_task("niah")


def _tiny(vocab, layer_types=("attention",), seed=0):
    from hylo_jax.config import GDNConfig, MLAConfig

    config = ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=16, intermediate_size=32,
        num_hidden_layers=len(layer_types), num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        tie_word_embeddings=True, layer_types=tuple(layer_types),
        mla=MLAConfig(kv_lora_rank=8, q_lora_rank=0, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
        if "mla" in layer_types else None,
        gdn=GDNConfig(num_heads=2, head_k_dim=8, head_v_dim=8) if "gdn" in layer_types else None,
    )
    return CausalLM(config, rngs=nnx.Rngs(seed))


def test_loss_by_position_equals_the_full_forward(tokenizer):
    import jax.numpy as jnp

    model = _tiny(len(tokenizer))
    stream, starts = long_loss.document_stream(tokenizer, "pydoc_topics", "heldout")
    windows = long_loss.samples(stream, starts, 200, 2, seed=0)
    assert windows.shape == (2, 201) and all(int(w[0]) in stream[starts] for w in windows)
    got = long_loss.token_losses(model, windows, chunk_size=64)
    logits = np.asarray(model(jnp.asarray(windows[:, :-1])), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = logz - np.take_along_axis(logits, windows[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    summary = long_loss.summarize(got)
    assert summary["bins"] == [[0, 64], [64, 128], [128, 200]]
    assert summary["loss"][0] == pytest.approx(float(want[:, :64].mean()), rel=1e-4)


def _suite_config(tmp_path, dirs, labels=""):
    from hylo_jax.config_files import load_config

    cfg = load_config("eval")
    cfg.models, cfg.labels, cfg.teacher = ",".join(dirs), labels, dirs[0]
    cfg.tasks = "niah_single_number,passkey"
    cfg.lengths = "300,400"
    cfg.samples = 2
    cfg.batch_size = 2
    cfg.prefill_chunk_size = 128
    cfg.haystack_corpora = "pydoc_topics"
    cfg.output_dir = str(tmp_path / "out")
    cfg.loss_by_position.corpus = "pydoc_topics"
    cfg.loss_by_position.length = 300
    cfg.loss_by_position.samples = 1
    cfg.short.corpus = "pydoc_topics"
    cfg.short.seq_len = 64
    cfg.short.windows = 2
    cfg.short.batch_size = 2
    return cfg


def _run_suite(tmp_path, monkeypatch, cfg, configs):
    """Runs the suite with a device that holds a 300-token prefill but not a 400-token one."""
    from hylo_jax.eval import suite
    from hylo_jax.inference import memory

    longest_new = max(tasks.get_task(t).max_new_tokens for t in cfg.tasks.split(","))
    fits = max(memory.estimate_prefill_memory(c, 2, 300 + longest_new, 128).peak for c in configs)
    too_big = min(memory.estimate_prefill_memory(c, 2, 400, 128).peak for c in configs)
    assert fits < too_big
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: fits)
    results = suite.run(cfg)
    out = tmp_path / "out"
    on_disk = json.load(open(out / "results.json"))
    assert on_disk == json.loads(json.dumps(results))
    for label in on_disk:
        for task in ("niah_single_number", "passkey"):
            ok, skipped = on_disk[label][task]["300"], on_disk[label][task]["400"]
            assert 0.0 <= ok["accuracy"] <= 1.0 and ok["n"] == 2
            assert skipped["accuracy"] is None and skipped["n"] == 0 and "GiB" in skipped["skipped"]
        lbp = on_disk[label]["loss_by_position"]
        assert lbp["length"] == 300 and len(lbp["loss"]) == len(lbp["bins"]) == 4 and lbp["bins"][-1] == [256, 300]
        assert on_disk[label]["short_context"]["ppl"] > 1.0
    md = open(out / "results.md").read()
    assert "| passkey |" in md and "skipped" in md and "## Loss by position" in md
    assert os.path.getsize(out / "results.png") > 1000
    lines = [json.loads(x) for x in open(out / "samples.jsonl").read().splitlines()]
    assert len(lines) == len(on_disk) * 2 * 2  # models x tasks x samples, at the one length that fits
    assert {"answers", "prediction", "score", "depth"} <= set(lines[0])
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    return on_disk


def _export(model, path, tokenizer) -> str:
    from hylo_jax.convert.export import export_model

    path = export_model(model, path)
    tokenizer.save_pretrained(path)  # the teacher's, already loaded (building it from the GGUF takes seconds)
    return path


def test_suite_writes_results_side_by_side(tmp_path, tokenizer, monkeypatch):
    model = _tiny(len(tokenizer))
    path = _export(model, str(tmp_path / "tiny"), tokenizer)
    # The same checkpoint twice under two names: the side-by-side layout, compiled once.
    on_disk = _run_suite(tmp_path, monkeypatch, _suite_config(tmp_path, [path, path], "a,b"), [model.config])
    assert list(on_disk) == ["a", "b"]
    assert on_disk["a"]["short_context"]["heldout_kl"] == 0.0  # the KL teacher is this model
    assert on_disk["a"]["passkey"] == on_disk["b"]["passkey"]  # same samples, same model


@pytest.mark.slow  # compiles a hybrid's prefill, decode and loss: minutes on a busy CPU
def test_suite_teacher_and_hybrid_side_by_side(tmp_path, tokenizer, monkeypatch):
    models = {"small": _tiny(len(tokenizer)), "hybrid": _tiny(len(tokenizer), ("mla", "gdn"))}
    dirs = [_export(m, str(tmp_path / k), tokenizer) for k, m in models.items()]
    on_disk = _run_suite(tmp_path, monkeypatch, _suite_config(tmp_path, dirs), [m.config for m in models.values()])
    assert list(on_disk) == ["small", "hybrid"]
    assert on_disk["small"]["short_context"]["heldout_kl"] == 0.0
    assert on_disk["hybrid"]["short_context"]["heldout_kl"] > 0.0


def test_cli_help_lists_every_field():
    from hylo_jax.config_files import load_config

    res = subprocess.run([sys.executable, "-m", "hylo_jax.eval", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert res.returncode == 0
    for field in load_config("eval").keys():
        assert f"{field}:" in res.stdout
