"""The evaluation suite: models side by side on the same samples, written as results.

`run(cfg)` evaluates each model of `cfg.models` in turn (one in memory at a time, and
the teacher too when the KL is asked for) on:

- the tasks of `cfg.tasks` at each length of `cfg.lengths` (hylo_jax.eval.tasks; the
  same seed gives every model the same samples, and equal tokenizers the same tokens);
- the loss by position over long held-out documents (hylo_jax.eval.long_loss);
- short-context quality: held-out perplexity (hylo_jax.eval.perplexity) and the KL to
  the teacher (hylo_jax.distill.train.heldout_kl) on the same held-out windows.

A length whose prefill cannot fit in the device's memory (the arithmetic of
hylo_jax.inference.memory, or an out-of-memory error while running) is recorded as
skipped, with the reason, and the run goes on.

Files in `cfg.output_dir`, rewritten (to a temporary name, then renamed) after every
task and length, so an interrupted run keeps what it measured:
- results.json: {model_label: {task: {str(length): {"accuracy", "n"[, "skipped"]}},
  "loss_by_position": {...}, "short_context": {"ppl", "heldout_kl"}}}
- results.md: a table of tasks x lengths, models side by side
- results.png: accuracy against length per task (one line per model), loss by position
- samples.jsonl: every sample's answers, generated text and score
- run.json: the config, device and haystack of the run
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def _list(text) -> list[str]:
    return [x.strip() for x in str(text).split(",")]


def _ints(text) -> list[int]:
    return [int(x) for x in _list(text) if x]


def model_specs(cfg) -> list[tuple[str, str]]:
    """[(label, path)] from cfg.models ("" = the default teacher) and cfg.labels."""
    paths = _list(cfg.models)
    labels = [x for x in _list(cfg.labels) if x] if cfg.labels else []
    if labels and len(labels) != len(paths):
        raise ValueError(f"config.labels has {len(labels)} names for {len(paths)} models (config.models)")
    if not labels:
        labels = ["teacher" if not p else os.path.basename(os.path.normpath(p)) for p in paths]
    seen: dict[str, int] = {}
    out = []
    for label, path in zip(labels, paths):
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label}_{seen[label]}", path))
    return out


def _write(path: str, text: str) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _is_oom(e: Exception) -> bool:
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


class Suite:
    def __init__(self, cfg):
        from hylo_jax.eval import tasks as tasks_lib

        self.cfg = cfg
        self.task_names = [t for t in _list(cfg.tasks) if t]
        for name in self.task_names:
            tasks_lib.get_task(name)  # unknown names fail before any model is loaded
        self.lengths = _ints(cfg.lengths)
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"config.lengths={cfg.lengths!r} must list positive token counts, e.g. 1024,4096")
        if cfg.samples < 1:
            raise ValueError(f"config.samples={cfg.samples} must be >= 1")
        self.specs = model_specs(cfg)
        self.results: dict = {}
        self.out = os.path.abspath(cfg.output_dir)
        os.makedirs(self.out, exist_ok=True)
        self._samples_file = os.path.join(self.out, "samples.jsonl")
        self._records: list[str] = []
        self._envs: dict = {}

    # ------------------------------------------------------------ one model
    def _env(self, tokenizer):
        from hylo_jax.eval.tasks import TaskEnv

        key = (type(tokenizer).__name__, len(tokenizer), tokenizer.name_or_path)
        if key not in self._envs:
            self._envs[key] = TaskEnv(
                tokenizer, chat_template=self.cfg.chat_template, haystack_corpora=_list(self.cfg.haystack_corpora),
                haystack_split=self.cfg.haystack_split, code_split=self.cfg.code_split,
            )
        return self._envs[key]

    def _fits(self, model, batch: int, length: int) -> str | None:
        """None, or why a prefill of `length` tokens cannot fit on the device."""
        import jax.numpy as jnp

        from hylo_jax.inference import memory

        c = self.cfg
        need = memory.estimate_prefill_memory(
            model.config, batch, length, c.prefill_chunk_size or length, dtype=jnp.dtype(c.dtype),
            cache_dtype=jnp.dtype(c.cache_dtype) if c.cache_dtype else None,
        ).peak
        have = memory.available_bytes()
        if have is not None and need > have:
            return f"needs about {need / 2**30:.1f} GiB (hylo_jax.inference.memory estimate), {have / 2**30:.1f} GiB available"
        return None

    def evaluate_model(self, label: str, path: str, teacher=None, *, model=None) -> None:
        """Every measurement of one model; `teacher` (a CausalLM) for the KL, `model`
        when it is already loaded (the teacher itself: its KL is 0)."""
        import jax.numpy as jnp

        from hylo_jax.eval import tasks as tasks_lib
        from hylo_jax.eval.predict import predictor, run_samples
        from hylo_jax.inference import generation_defaults, load_tokenizer
        from hylo_jax.loading import load_model

        c = self.cfg
        tokenizer = load_tokenizer(path or None)
        defaults = generation_defaults(path or None, tokenizer)
        if model is None:
            model = load_model(path or None, dtype=jnp.dtype(c.dtype), progress=False)
        res = self.results.setdefault(label, {})
        env = self._env(tokenizer)
        predict = predictor(model, tokenizer, batch_size=c.batch_size, prefill_chunk_size=c.prefill_chunk_size or None,
                            eos_token_id=defaults.eos_token_id or None)
        units = [(t, n) for t in self.task_names for n in self.lengths]
        bar = tqdm(total=len(units) * c.samples, desc=label, unit="sample")
        for name, length in units:
            task = tasks_lib.get_task(name)
            bar.set_postfix_str(f"{name} @ {length}")
            entry = res.setdefault(name, {})
            why = self._fits(model, c.batch_size, length + task.max_new_tokens)
            if why is None:
                try:
                    samples = task.samples(env, length, c.samples, c.seed)
                    scores = []
                    for lo in range(0, len(samples), c.batch_size):
                        batch = samples[lo : lo + c.batch_size]
                        out = run_samples(task, predict, batch)
                        for i, r in enumerate(out["records"]):
                            scores.append(r["score"])
                            self._records.append(json.dumps({"model": label, "task": name, "length": length,
                                                             "index": lo + i, **r}))
                        bar.update(len(batch))
                    entry[str(length)] = {"accuracy": float(np.mean(scores)), "n": len(scores)}
                except Exception as e:  # noqa: BLE001 - only out-of-memory is a skip
                    if not _is_oom(e):
                        raise
                    why = f"out of memory: {str(e).splitlines()[0][:200]}"
            if why is not None:
                entry[str(length)] = {"accuracy": None, "n": 0, "skipped": why}
                log.warning("%s: %s at %d tokens skipped: %s", label, name, length, why)
                bar.update(c.samples)
            self.write()
        bar.close()
        if c.loss_by_position.enabled:
            res["loss_by_position"] = self._loss_by_position(model, tokenizer)
            self.write()
        if c.short.enabled:
            res["short_context"] = self._short(model, tokenizer, teacher)
            self.write()

    def _loss_by_position(self, model, tokenizer) -> dict:
        import jax.numpy as jnp

        from hylo_jax.eval import long_loss

        c = self.cfg.loss_by_position
        length = c.length or max(self.lengths)
        why = self._fits(model, 1, length)
        if why is not None:
            return {"length": length, "skipped": why}
        stream, starts = long_loss.document_stream(tokenizer, c.corpus, c.split)
        windows = long_loss.samples(stream, starts, length, c.samples, self.cfg.seed)
        cache_dtype = jnp.dtype(self.cfg.cache_dtype) if self.cfg.cache_dtype else None
        try:
            losses = np.concatenate([
                long_loss.token_losses(model, windows[i : i + 1], chunk_size=self.cfg.prefill_chunk_size or length,
                                       cache_dtype=cache_dtype)
                for i in tqdm(range(len(windows)), desc="loss by position", unit="document")
            ])
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            return {"length": length, "skipped": f"out of memory: {str(e).splitlines()[0][:200]}"}
        return {"length": length, "samples": len(windows), "corpus": f"{c.split} split of {c.corpus}",
                **long_loss.summarize(losses)}

    def _short(self, model, tokenizer, teacher) -> dict:
        from hylo_jax.distill.train import heldout_kl
        from hylo_jax.eval import perplexity

        c = self.cfg.short
        tokens = perplexity.heldout_tokens(tokenizer, c.corpus, "heldout", max_tokens=c.seq_len * c.windows)
        out = {"ppl": perplexity.perplexity(model, tokens, seq_len=c.seq_len, batch_size=c.batch_size,
                                            max_windows=c.windows)["ppl"],
               "corpus": f"heldout split of {c.corpus}", "seq_len": c.seq_len}
        if teacher is model:
            out["heldout_kl"] = 0.0
        elif teacher is not None:
            windows = perplexity.windows(tokens, c.seq_len, c.windows)
            out["heldout_kl"] = heldout_kl(model, teacher, windows, c.batch_size)
        return out

    # ------------------------------------------------------------ all models
    def run(self) -> dict:
        import jax
        import jax.numpy as jnp

        from hylo_jax.convert.hub import resolve
        from hylo_jax.loading import load_model

        c = self.cfg
        _write(os.path.join(self.out, "run.json"), json.dumps({
            "config": c.to_dict(), "models": dict(self.specs), "device": jax.devices()[0].device_kind,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
        }, indent=1))
        self.check_inputs()
        teacher = None
        if c.short.enabled and c.short.kl:
            teacher = load_model(c.teacher or None, dtype=jnp.dtype(c.dtype), progress=False)
        teacher_path = resolve(c.teacher or None).path
        for label, path in self.specs:
            same = teacher is not None and resolve(path or None).path == teacher_path
            log.info("evaluating %s (%s)", label, path or "default teacher")
            self.evaluate_model(label, path, teacher, model=teacher if same else None)
        return self.results

    def check_inputs(self) -> None:
        """Builds one sample of every task at the longest length with each model's
        tokenizer, so a haystack too short for a length fails before any model runs."""
        from hylo_jax.eval import tasks as tasks_lib
        from hylo_jax.inference import load_tokenizer

        for _, path in self.specs:
            env = self._env(load_tokenizer(path or None))
            for name in self.task_names:
                tasks_lib.get_task(name).samples(env, max(self.lengths), 1, self.cfg.seed)

    # ------------------------------------------------------------ output
    def write(self) -> None:
        from hylo_jax.eval import report

        _write(os.path.join(self.out, "results.json"), json.dumps(self.results, indent=1))
        _write(self._samples_file, "\n".join(self._records) + ("\n" if self._records else ""))
        _write(os.path.join(self.out, "results.md"), report.markdown(self.results, self.task_names, self.lengths))
        report.plot(self.results, self.task_names, os.path.join(self.out, "results.png"))


def run(cfg) -> dict:
    """Runs the suite a config describes (configs/eval.py); returns results.json's dict."""
    return Suite(cfg).run()
