"""Timing and reporting shared by every `python -m tools.bench` subcommand.

Timing: `median_time` times a call the way a training loop issues it (warm-up, then the
median of samples, each a run of back-to-back calls closed by one synchronisation);
`torch_times` adds triton's do_bench for torch baselines. Reporting: `Report` keeps one
JSON file (rewritten after every record, so a run cut short by a timeout keeps what it
measured) and appends markdown table rows under a line that names the command, the
hardware, the commit and the date.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------ timing
def median_time(fn, *args, samples=10, warmup=2, sample_seconds=0.02, max_reps=100, sync=jax.block_until_ready):
    """Median time per call of fn(*args) issued back to back, in seconds. Each sample times
    `reps` calls and one synchronisation after the last (`sync`; torch callers pass one that
    waits for the CUDA device), so the host's dispatch of a call overlaps the device's work
    on the one before, as in a training loop; reps (up to `max_reps`) makes a sample last
    about `sample_seconds`. Synchronising after every call instead would add the dispatch
    and the wake-up to every sample."""
    for _ in range(warmup):
        sync(fn(*args))
    t0 = time.perf_counter()
    sync(fn(*args))
    reps = int(min(max_reps, max(1, sample_seconds // (time.perf_counter() - t0))))
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        sync(out)
        times.append((time.perf_counter() - t0) / reps)
    return float(np.median(times))


def jit_fwd_and_fwd_bwd(fwd):
    """jit(fwd) and jit of its VJP; fwd returns (out, final_state), fwd_bwd takes the
    inputs then d_out (the final state's cotangent is zero)."""

    def fwd_bwd(*args):
        *xs, d_out = args
        (_, final), vjp = jax.vjp(fwd, *xs)
        return vjp((d_out, jnp.zeros_like(final)))

    return jax.jit(fwd), jax.jit(fwd_bwd)


def torch_times(fn, grad):
    """Two timings in seconds of a torch call `fn` (grad: with autograd on): the median of
    triton's do_bench (CUDA events around each call, L2 flushed before it), and
    `median_time` as our JAX forms are timed (calls back to back, one device
    synchronisation per sample; PyTorch's host work per call included where the device
    waits on it)."""
    import torch
    import triton

    with torch.set_grad_enabled(grad):
        ms = triton.testing.do_bench(fn, return_mode="median")
        return ms / 1e3, median_time(fn, sync=lambda _: torch.cuda.synchronize())


def to_torch(x, requires_grad=False):
    """A JAX array as a CUDA torch tensor of the same dtype (bfloat16 or float32)."""
    import torch

    t = torch.from_numpy(np.asarray(x.astype(jnp.float32))).to("cuda")
    t = t.to(torch.bfloat16) if x.dtype == jnp.bfloat16 else t
    return t.requires_grad_(requires_grad)


def rel_rms(x, ref) -> float:
    """Accuracy of a benchmarked result: ||x - ref|| / ||ref|| in float64 on the host."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (den if den else 1.0))


def measure_peaks():
    """(bf16 matmul FLOP/s, copy bytes/s) measured on the default device: one large matmul
    and one large copy (smaller ones on a CPU, where only the tool's plumbing is tried)."""
    cpu = jax.default_backend() == "cpu"
    n = 1024 if cpu else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    flops = 2 * n**3 / median_time(jax.jit(lambda a, b: a @ b), a, b)
    x = jax.random.normal(jax.random.key(2), ((16 if cpu else 256) * 1024 * 1024,), jnp.float32)
    bw = 2 * x.nbytes / median_time(jax.jit(lambda x: x * 1.5), x)
    return flops, bw


def require_gpu(what: str) -> None:
    """Exit with a message (not a traceback) unless JAX sees a CUDA GPU."""
    if jax.default_backend() != "gpu":
        raise SystemExit(f"{what} needs a CUDA GPU; JAX sees only {jax.devices()[0].platform} here. "
                         "Run it on the GPU machine (tools/README.md).")


# --------------------------------------------------------------------------- reporting
def commit() -> str:
    """The checkout's commit (with -dirty if it has changes), else $HYLO_COMMIT (set it where
    the tree was copied without .git), else "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("HYLO_COMMIT", "unknown")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def environment() -> dict:
    """What a number needs beside it: the command, device, host, jax version, commit, date."""
    dev = jax.devices()[0]
    return {
        "command": "python -m tools.bench " + shlex.join(sys.argv[1:]),
        "device": dev.device_kind if dev.platform != "cpu" else f"CPU: {cpu_name()}",
        "platform": dev.platform,
        "host": f"{cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "jax": jax.__version__,
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a report's rows: the record's key, the markdown title and format."""

    key: str
    title: str
    fmt: str = "{}"


class Report:
    """A run's records: printed, kept in a JSON file (--json) and appended as markdown rows
    (--markdown) under a line naming the command, device, commit and date.

    JSON: {"header": environment(), "results": [rows...], other keys set by `add`}.
    """

    def __init__(self, columns, json_path=None, markdown_path=None, **header):
        self.columns = tuple(columns)
        self.json_path, self.markdown_path = json_path, markdown_path
        self.data = {"header": {**environment(), **header}, "results": []}
        self._table_open = False
        print(json.dumps(self.data["header"]), flush=True)
        self.save()

    def save(self):
        if self.json_path:
            tmp = self.json_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1, default=str)
            os.replace(tmp, self.json_path)

    def add(self, key, value):
        """A record outside the table (a check's errors, a sweep's choice)."""
        self.data[key] = value
        print(f"{key}: {json.dumps(value, default=str)}", flush=True)
        self.save()

    def row(self, **record):
        """One table row: printed, in the JSON's results and appended to the markdown."""
        self.data["results"].append(record)
        self.save()
        cells = [c.fmt.format(record[c.key]) if record.get(c.key) is not None else "" for c in self.columns]
        print("  ".join(f"{c.title} {v}" for c, v in zip(self.columns, cells) if v), flush=True)
        if self.markdown_path:
            with open(self.markdown_path, "a") as f:
                if not self._table_open:
                    h = self.data["header"]
                    f.write(f"\n`{h['command']}`: {h['device']}, jax {h['jax']}, commit {h['commit']}, {h['date']}\n\n"
                            f"| {' | '.join(c.title for c in self.columns)} |\n|{'---|' * len(self.columns)}\n")
                    self._table_open = True
                f.write(f"| {' | '.join(cells)} |\n")

    def fail(self, what, exc):
        """Record that `what` failed with `exc` and go on (compiler errors keep their end)."""
        text = str(exc)
        if len(text) > 1200:
            text = text[:400] + " ... " + text[-800:]
        msg = f"{what} failed: {type(exc).__name__}: {text}"
        traceback.print_exc()
        print(msg, flush=True)
        self.data.setdefault("failures", []).append(msg)
        self.save()


def add_report_arguments(parser):
    """--json and --markdown, the same for every subcommand."""
    parser.add_argument("--json", default=None, help="write the run's records to this JSON file (rewritten as they come)")
    parser.add_argument("--markdown", default=None, help="append one markdown table row per measurement to this file")
