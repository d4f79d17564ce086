"""Checkpointer: exact resume of model, optimizer, RNG and data iterator; keep-last-K;
pre-emption by SIGTERM (in-process and in a subprocess that is really signalled)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hylo_jax.checkpoint import Checkpointer
from hylo_jax.convert.hub import load_tokenizer
from hylo_jax.distill import data


class Tiny(nnx.Module):
    def __init__(self, vocab, *, rngs):
        self.embed = nnx.Embed(vocab, 8, rngs=rngs)
        self.out = nnx.Linear(8, vocab, rngs=rngs)

    def __call__(self, ids):
        return self.out(self.embed(ids))


@nnx.jit
def train_step(model, optimizer, batch, rng):
    rng, drop_rng = jax.random.split(rng)
    # A random token-dropping mask, so a wrongly restored RNG changes the losses.
    keep = jax.random.bernoulli(drop_rng, 0.8, batch["loss_mask"].shape)

    def loss_fn(model):
        logits = model(batch["input_ids"])
        targets = jnp.roll(batch["input_ids"], -1, axis=1)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        mask = batch["loss_mask"] * keep
        return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, rng


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _setup(tokenizer, init_seed):
    cfg = data.default_config()
    cfg.kind, cfg.name, cfg.split, cfg.num_threads = "corpus", "pydoc_topics", "heldout", 1
    it = data.make_dataset(cfg, tokenizer, seq_len=16, batch_size=2, seed=3, shard=(0, 1))
    model = Tiny(len(tokenizer), rngs=nnx.Rngs(init_seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    return model, optimizer, it, jax.random.key(init_seed + 100)


def _train(model, optimizer, it, rng, steps):
    losses, batches = [], []
    for _ in range(steps):
        batch = next(it)
        loss, rng = train_step(model, optimizer, batch, rng)
        losses.append(float(loss))
        batches.append(batch["input_ids"])
    return losses, batches, rng


def test_resume_reproduces_losses_and_batches(tmp_path, tokenizer):
    model, optimizer, it, rng = _setup(tokenizer, 0)
    ref_losses, ref_batches, _ = _train(model, optimizer, it, rng, 6)

    model, optimizer, it, rng = _setup(tokenizer, 0)
    with Checkpointer(tmp_path, save_every=3, keep=2) as ckpt:
        assert ckpt.restore(model=model, optimizer=optimizer, rng=rng, data_iter=it) is None
        for step in range(1, 4):
            _, _, rng = _train(model, optimizer, it, rng, 1)
            ckpt.save(step, model=model, optimizer=optimizer, rng=rng, data_iter=it, extra={"stage": 2})
        # Training goes on after the (async) save; the checkpoint must not see it.
        _train(model, optimizer, it, rng, 2)
    assert Checkpointer(tmp_path, save_every=3).all_steps() == [3]

    # A different initialisation and a fresh iterator: everything must come from disk.
    model, optimizer, it, rng = _setup(tokenizer, 1)
    with Checkpointer(tmp_path, save_every=3, keep=2) as ckpt:
        restored = ckpt.restore(model=model, optimizer=optimizer, rng=rng, data_iter=it)
    assert restored.step == 3 and restored.extra == {"stage": 2}
    assert int(optimizer.step[...]) == 3
    losses, batches, _ = _train(model, optimizer, it, restored.rng, 3)
    assert losses == ref_losses[3:]  # bit-exact, not approximately
    for got, want in zip(batches, ref_batches[3:]):
        np.testing.assert_array_equal(got, want)


def test_plain_pytrees_and_keep_last(tmp_path):
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
    raw_key = jax.random.PRNGKey(7)  # an old-style uint32 key
    with Checkpointer(tmp_path, save_every=2, keep=2, async_save=False) as ckpt:
        for step in range(1, 8):
            tree = jax.tree.map(lambda x: x + step, params)
            ckpt.save(step, model=tree, rng=raw_key)
        assert ckpt.all_steps() == [4, 6]
        template = jax.tree.map(jnp.zeros_like, params)
        restored = ckpt.restore(model=template, rng=jnp.zeros_like(raw_key), step=4)
        with pytest.raises(FileNotFoundError, match="no checkpoint for step 2"):
            ckpt.restore(model=template, step=2)
        with pytest.raises(KeyError, match="no 'optimizer' item"):
            ckpt.restore(optimizer=template)
    got = restored.trees["model"]
    assert got["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(got["w"], params["w"] + 4)
    np.testing.assert_array_equal(restored.rng, raw_key)


def test_sigterm_requests_a_save_at_the_next_step(tmp_path):
    model = Tiny(11, rngs=nnx.Rngs(0))
    previous = signal.getsignal(signal.SIGTERM)
    ckpt = Checkpointer(tmp_path, save_every=1000)
    ckpt.install_preemption_handler()
    try:
        assert not ckpt.save(5, model=model)  # not a save step
        os.kill(os.getpid(), signal.SIGTERM)
        assert ckpt.preemption_requested and not ckpt.stop_requested
        assert ckpt.save(7, model=model)
        assert ckpt.stop_requested
        assert ckpt.latest_step == 7  # already on disk: save() waited
    finally:
        ckpt.close()
    assert signal.getsignal(signal.SIGTERM) is previous


_CHILD = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from hylo_jax.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], save_every=10_000)
    ckpt.install_preemption_handler()
    params = {"w": jnp.zeros(4)}
    for step in range(1, 100_000):
        params = {"w": params["w"] + 1}
        time.sleep(0.01)
        ckpt.save(step, model=params)
        if step == 3:
            print("running", flush=True)
        if ckpt.stop_requested:
            print("stopped", step, flush=True)
            break
    ckpt.close()
    """
)


@pytest.mark.slow
def test_sigterm_to_a_training_process(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path / "ck")], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    assert proc.stdout.readline().strip() == "running"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    stopped_at = int(out.split()[-1])
    ckpt = Checkpointer(tmp_path / "ck", save_every=10_000)
    assert ckpt.all_steps() == [stopped_at]
    restored = ckpt.restore(model={"w": jnp.zeros(4)})
    np.testing.assert_array_equal(restored.trees["model"]["w"], np.full(4, stopped_at, np.float32))
    ckpt.close()
