"""Benchmark the linear-recurrence kernels on one accelerator.

    python tools/bench_kernels.py --op gdn [--batch 1 4] [--seqlen 2048 8192 32768 65536]
        [--heads 32 --dk 64 --dv 64] [--time-budget 300] [--json out.json] [--markdown rows.md]
        [--no-fla] [--no-check]

The issue's reference shape (B, T, H, D) = (1, 16384, 16, 128) is
`--batch 1 --seqlen 16384 --heads 16 --dk 128 --dv 128`.

Prints one row per (impl, pass, B, T): median time, TFLOP/s under the FLOP model
stated in each section, and the fraction of the roofline floor max(flops / peak
matmul rate, minimum bytes / copy bandwidth) that was reached, with both peaks
measured on the device at start (a large bf16 matmul and a large copy).

Sections: "gdn" (pallas_kernels.gated_delta_rule: our Pallas and XLA forms and, if
importable, flash-linear-attention's Triton chunk_gated_delta_rule) and "ssd". Rows are
printed, appended to --markdown and the JSON rewritten as they come, so a run cut short
by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels._common import rel_rms  # noqa: E402


# ----------------------------------------------------------------- shared helpers
def median_time(fn, *args, samples=10, warmup=2, sample_seconds=0.02, max_reps=100, sync=jax.block_until_ready):
    """Median time per call of fn(*args) issued back to back, in seconds. Each sample times
    `reps` calls and one synchronisation after the last (`sync`; torch callers pass one that
    waits for the CUDA device), so the host's dispatch of a call overlaps the device's work
    on the one before, as in a training loop; reps (up to `max_reps`) makes a sample last
    about `sample_seconds`. Synchronising after every call instead would add the dispatch
    and the wake-up, about 0.25 ms for our GDN forward on an H200 (BENCHMARKS.md)."""
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


def torch_times(fn, grad):
    """Two timings in seconds of a torch call `fn` (grad: with autograd on): the median of
    triton's do_bench (CUDA events around each call, L2 flushed before it; how the issue's
    reference figures were taken), and `median_time` as our JAX forms are timed (calls back
    to back, one device synchronisation per sample; PyTorch's host work per call included
    where the device waits on it)."""
    import torch
    import triton

    with torch.set_grad_enabled(grad):
        ms = triton.testing.do_bench(fn, return_mode="median")
        return ms / 1e3, median_time(fn, sync=lambda _: torch.cuda.synchronize())


def time_torch_baseline(results, peaks, name, fwd, fwd_bwd, b, t, flops, bytes_fwd, bytes_fwd_bwd):
    """Rows for a torch baseline by `torch_times`: `name` (do_bench) and `name`-piped."""
    for mode, fn, fl, nbytes in (("fwd", fwd, flops, bytes_fwd), ("fwd+bwd", fwd_bwd, 3 * flops, bytes_fwd_bwd)):
        bench, piped = torch_times(fn, grad=mode == "fwd+bwd")
        row(results, peaks, name, mode, b, t, bench, fl, nbytes)
        row(results, peaks, f"{name}-piped", mode, b, t, piped, fl, nbytes)


def measure_peaks():
    """(bf16 matmul FLOP/s, copy bytes/s) measured on the default device."""
    n = 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    flops = 2 * n**3 / median_time(mm, a, b)
    x = jax.random.normal(jax.random.key(2), (256 * 1024 * 1024,), jnp.float32)  # 1 GiB
    cp = jax.jit(lambda x: x * 1.5)
    bw = 2 * x.nbytes / median_time(cp, x)
    return flops, bw


# Where rows go besides stdout (set in main): a markdown file, the JSON report, and the
# current problem's (H, K, V), written into each row.
_SINK = dict(markdown=None, json=None, report=None, dims=None)


def _flush_report():
    if _SINK["json"] and _SINK["report"] is not None:
        with open(_SINK["json"], "w") as f:
            json.dump(_SINK["report"], f, indent=1)


def row(results, peaks, name, mode, b, t, seconds, flops, nbytes, extra=""):
    peak_flops, peak_bw = peaks
    floor = max(flops / peak_flops, nbytes / peak_bw)
    h, dk, dv = _SINK["dims"] or (None, None, None)
    rec = dict(impl=name, mode=mode, B=b, T=t, H=h, K=dk, V=dv, ms=seconds * 1e3, tflops=flops / seconds / 1e12,
               roofline_fraction=floor / seconds, note=extra)
    results.append(rec)
    print(f"{name:10s} {mode:8s} B={b} T={t:6d} H={h} K={dk} V={dv} {rec['ms']:9.3f} ms {rec['tflops']:7.2f} "
          f"TFLOP/s roofline {rec['roofline_fraction']:6.1%} {extra}", flush=True)
    if _SINK["markdown"]:
        with open(_SINK["markdown"], "a") as f:
            f.write(f"| {name} | {mode} | {b} | {t} | {h} | {dk} | {dv} | {rec['ms']:.3f} ms | {rec['tflops']:.2f} | "
                    f"{rec['roofline_fraction']:.1%} |\n")
    _flush_report()


# -------------------------------------------------------------- gated delta rule
def gdn_flops(b, t, h, dk, dv, c):
    """Forward FLOPs of the chunked algorithm: per token and head 4CK (K K^T, Q K^T),
    C(K+V) (triangular solve on [C, K+V]), 6KV (w S, q S, state update), 2CV (Aqk v_new).
    Forward+backward is counted as 3x forward (the usual convention)."""
    return 2 * b * t * h * (2 * c * dk + c * (dk + dv) // 2 + 3 * dk * dv + c * dv)


def gdn_bytes(b, t, h, dk, dv, itemsize=2, backward=False):
    """Fewest bytes: read q, k, v (bf16), g (f32), beta (bf16), write o (bf16) and the final
    state (f32); the backward also reads them and do, and writes dq, dk, dv, dg, dbeta."""
    io = b * t * h * (itemsize * (2 * dk + dv + 1) + 4)
    fwd = io + b * t * h * dv * itemsize + 4 * b * h * dk * dv
    return fwd + (2 * io + b * t * h * dv * itemsize if backward else 0)


def gdn_inputs(b, t, h, dk, dv, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    l2 = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = l2(jax.random.normal(ks[0], (b, t, h, dk))).astype(jnp.bfloat16)
    k = l2(jax.random.normal(ks[1], (b, t, h, dk))).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, h, dv), jnp.bfloat16)
    g = jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[3], (b, t, h)) + 3.0)  # float32 log-decay
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h))).astype(jnp.bfloat16)
    do = jax.random.normal(ks[5], (b, t, h, dv), jnp.bfloat16)
    return q, k, v, g, beta, do


def _jit_fwd_and_fwd_bwd(fwd):
    """jit(fwd) and jit of its VJP; fwd returns (out, final_state), fwd_bwd takes the
    inputs then d_out (the final state's cotangent is zero)."""

    def fwd_bwd(*args):
        *inputs, d_out = args
        (_, final), vjp = jax.vjp(fwd, *inputs)
        return vjp((d_out, jnp.zeros_like(final)))

    return jax.jit(fwd), jax.jit(fwd_bwd)


def _jax_fns(impl, chunk):
    """impl: one of chunk_gated_delta_rule's, or "pallas-xla-prepare" (the Pallas form
    with its chunk-local part in XLA, `prepare_impl="xla"`)."""
    from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule, chunk_gated_delta_rule_pallas

    if impl == "pallas-xla-prepare":
        return _jit_fwd_and_fwd_bwd(lambda q, k, v, g, beta: chunk_gated_delta_rule_pallas(
            q, k, v, g, beta, output_final_state=True, chunk_size=chunk, prepare_impl="xla"))
    return _jit_fwd_and_fwd_bwd(lambda q, k, v, g, beta: chunk_gated_delta_rule(
        q, k, v, g, beta, output_final_state=True, chunk_size=chunk, impl=impl))


def _fla():
    """flash-linear-attention's chunk_gated_delta_rule, or None when it is not installed."""
    try:
        import torch  # noqa: F401
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as e:  # noqa: BLE001 - any import failure means: no fla here
        print(f"fla not available: {type(e).__name__}: {e}")
        return None
    return chunk_gated_delta_rule


def _to_torch(x, requires_grad=False):
    import torch

    t = torch.from_numpy(np.asarray(x.astype(jnp.float32))).to("cuda")
    t = t.to(torch.bfloat16) if x.dtype == jnp.bfloat16 else t
    return t.requires_grad_(requires_grad)


def check_fla_gradients(fla_fn, h=4, dk=64, dv=64, t=1000):
    """fla's output and gradients vs our float64 per-step reference; also whether its gated
    backward refuses on this Triton/Hopper without the TRITON_ABOVE_3_7_1 override."""
    import fla.ops.common.chunk_o as chunk_o
    import torch

    from pallas_kernels.gated_delta_rule import fused_recurrent_gated_delta_rule

    q, k, v, g, beta, do = gdn_inputs(1, t, h, dk, dv, seed=3)
    tq = [_to_torch(x, True) for x in (q, k, v, g, beta)]
    tdo = _to_torch(do)
    status = {"triton": __import__("triton").__version__}
    try:
        o, _ = fla_fn(*tq, output_final_state=True)
        o.backward(tdo)
        status["refused_without_override"] = False
    except RuntimeError as e:
        status["refused_without_override"] = str(e).split("\n")[0][:160]
        for x in tq:
            x.grad = None
        chunk_o.TRITON_ABOVE_3_7_1 = True  # bypass the version gate to measure what it computes
        o, _ = fla_fn(*tq, output_final_state=True)
        o.backward(tdo)
    torch.cuda.synchronize()
    with jax.enable_x64(True):
        args64 = [x.astype(jnp.float64) for x in (q, k, v, g, beta)]
        fn = lambda *a: fused_recurrent_gated_delta_rule(*a)[0]
        o_ref, vjp = jax.vjp(fn, *args64)
        grads_ref = vjp(do.astype(jnp.float64))
        errs = {"o": rel_rms(o.detach().float().cpu().numpy(), o_ref)}
        for name, x, gr in zip(("dq", "dk", "dv", "dg", "dbeta"), tq, grads_ref):
            errs[name] = rel_rms(x.grad.float().cpu().numpy(), gr)
    status["rel_rms_vs_f64_reference"] = errs
    status["gradients_ok(<=2e-2)"] = bool(all(e <= 2e-2 for e in errs.values()))
    print("fla check:", json.dumps(status), flush=True)
    return status


def check_ours(h=4, dk=64, dv=64, t=1000):
    """Our Pallas form on the same bf16 problem as check_fla_gradients, vs the f64 reference."""
    from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    q, k, v, g, beta, do = gdn_inputs(1, t, h, dk, dv, seed=3)
    fn = lambda *a: chunk_gated_delta_rule(*a, impl="pallas")[0]
    o, vjp = jax.vjp(fn, q, k, v, g, beta)
    grads = vjp(do)
    with jax.enable_x64(True):
        args64 = [x.astype(jnp.float64) for x in (q, k, v, g, beta)]
        o_ref, vjp_ref = jax.vjp(lambda *a: fused_recurrent_gated_delta_rule(*a)[0], *args64)
        grads_ref = vjp_ref(do.astype(jnp.float64))
        errs = {"o": rel_rms(o, o_ref)}
        errs.update({n: rel_rms(a, b) for n, a, b in zip(("dq", "dk", "dv", "dg", "dbeta"), grads, grads_ref)})
    print("ours (pallas, bf16) check:", json.dumps(errs), flush=True)
    return errs


def _prepare_fns(scale, chunk):
    """{name: (jit fwd, jit fwd+bwd)} of the chunk-local preparation alone: "prepare-xla"
    (xla.prepare) and, on GPU, the `gpu_prepare` kernels ("prepare-pallas")."""
    from pallas_kernels.gated_delta_rule import gpu_prepare
    from pallas_kernels.gated_delta_rule.xla import prepare

    kw = dict(scale=scale, segment_ids=None, chunk_size=chunk)

    def fns_of(fn):
        def fwd_bwd(*a):
            out, vjp = jax.vjp(lambda *x: fn(*x, **kw), *a)
            return vjp(out)  # the outputs themselves as cotangents: same shapes, no extra inputs

        return jax.jit(lambda *a: fn(*a, **kw)), jax.jit(fwd_bwd)

    fns = {"prepare-xla": fns_of(prepare)}
    if jax.default_backend() == "gpu":
        fns["prepare-pallas"] = fns_of(gpu_prepare.prepare)
    return fns


def _compare_prepare(prep_fns, args, report, key):
    """rel-RMS of each prepare variant's outputs vs xla.prepare's."""
    base = prep_fns["prepare-xla"][0](*args)
    errs = {}
    for name, (pf, _) in prep_fns.items():
        if name != "prepare-xla":
            errs[name] = {f: rel_rms(np.asarray(a, np.float32), np.asarray(b, np.float32))
                          for f, a, b in zip(base._fields, pf(*args), base)}
    report[key] = errs
    print(f"{key}: {json.dumps(errs)}", flush=True)


def tune_gdn_gpu(args, chunk, report, t=8192):
    """Sweep the walks' V block and warps at the first --batch; keep the fastest fwd+bwd."""
    from pallas_kernels.gated_delta_rule import gpu

    b = args.batch[0]
    q, k, v, g, beta, do = gdn_inputs(b, t, args.heads, args.dk, args.dv)
    timings = []
    for block_v in (16, 32, 64):
        for num_warps in (2, 4, 8):
            gpu.BLOCKS.update(block_v=block_v, num_warps=num_warps)
            fwd, fwd_bwd = _jax_fns("pallas", chunk)
            try:
                tf = median_time(fwd, q, k, v, g, beta)
                tfb = median_time(fwd_bwd, q, k, v, g, beta, do)
            except Exception as e:  # noqa: BLE001
                print(f"tune {gpu.BLOCKS} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            timings.append((tfb, tf, dict(gpu.BLOCKS)))
            print(f"tune B={b} T={t} {gpu.BLOCKS}: fwd {tf * 1e3:.3f} ms, fwd+bwd {tfb * 1e3:.3f} ms", flush=True)
    best = min(timings, key=lambda x: x[0])[2]
    gpu.BLOCKS.update(best)
    report["gpu_blocks"] = best
    report["tuning"] = [dict(cfg, fwd_ms=tf * 1e3, fwd_bwd_ms=tfb * 1e3) for tfb, tf, cfg in timings]
    print(f"tuned GPU blocks: {best}", flush=True)


def tune_prepare_gpu(args, chunk, report, t=16384):
    """Time the whole op (our Pallas form), fwd and fwd+bwd, with each `gpu_prepare`
    kernel's warps swept in turn (the others at their BLOCKS value); leaves BLOCKS as it
    found them (this is a probe, not a choice)."""
    from pallas_kernels.gated_delta_rule import gpu_prepare

    b = args.batch[0]
    q, k, v, g, beta, do = gdn_inputs(b, t, args.heads, args.dk, args.dv)
    base = dict(gpu_prepare.BLOCKS)
    timings = []
    for kernel in base:
        for num_warps in (2, 4, 8):
            gpu_prepare.BLOCKS.update(base, **{kernel: num_warps})
            jax.clear_caches()
            fwd, fwd_bwd = _jax_fns("pallas", chunk)
            try:
                tf, tfb = median_time(fwd, q, k, v, g, beta), median_time(fwd_bwd, q, k, v, g, beta, do)
            except Exception as e:  # noqa: BLE001
                print(f"tune prepare {gpu_prepare.BLOCKS} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            timings.append(dict(gpu_prepare.BLOCKS, fwd_ms=tf * 1e3, fwd_bwd_ms=tfb * 1e3))
            print(f"tune prepare B={b} T={t} {gpu_prepare.BLOCKS}: op fwd {tf * 1e3:.3f} ms, "
                  f"fwd+bwd {tfb * 1e3:.3f} ms", flush=True)
    gpu_prepare.BLOCKS.update(base)
    report["prepare_tuning"] = timings


def bench_gdn(args, peaks, results, report):
    chunk = 64
    h, dk, dv = args.heads, args.dk, args.dv
    _SINK["dims"] = (h, dk, dv)
    fla_fn = None if args.no_fla else _fla()
    # Checks at the benchmark's H, K, V, so fla's autotuning there serves the timings too.
    if not args.no_check:
        report["gdn_ours_check"] = check_ours(h, dk, dv)
        _flush_report()
    if fla_fn is not None:
        report["gdn_fla_check"] = check_fla_gradients(fla_fn, h, dk, dv)
        _flush_report()
    tune = set(args.tune or ()) or ({"prepare", "recurrence"} if args.tune is not None else set())
    if "pallas" in args.impls and "prepare" in tune:
        tune_prepare_gpu(args, chunk, report)
        _flush_report()
    if "pallas" in args.impls and "recurrence" in tune:
        tune_gdn_gpu(args, chunk, report)
    start = time.perf_counter()
    fns = {impl: _jax_fns(impl, chunk) for impl in args.impls}
    prep_fns = _prepare_fns(dk**-0.5, chunk) if "pallas" in fns and not args.no_prepare else {}
    for b in args.batch:
        for t in args.seqlen:
            if time.perf_counter() - start > args.time_budget:
                print(f"time budget spent: skipped B={b} T={t}", flush=True)
                report.setdefault("skipped", []).append((b, t))
                continue
            q, k, v, g, beta, do = gdn_inputs(b, t, h, dk, dv)
            fl = gdn_flops(b, t, h, dk, dv, chunk)
            by_f, by_fb = gdn_bytes(b, t, h, dk, dv), gdn_bytes(b, t, h, dk, dv, backward=True)
            for impl, (fwd, fwd_bwd) in fns.items():
                try:
                    row(results, peaks, impl, "fwd", b, t, median_time(fwd, q, k, v, g, beta), fl, by_f)
                    row(results, peaks, impl, "fwd+bwd", b, t, median_time(fwd_bwd, q, k, v, g, beta, do), 3 * fl,
                        by_fb)
                    if t == max(args.seqlen) and impl == "pallas":
                        o, s = fwd(q, k, v, g, beta)
                        grads = fwd_bwd(q, k, v, g, beta, do)
                        finite = bool(all(jnp.isfinite(x.astype(jnp.float32)).all() for x in (o, s, *grads)))
                        report[f"finite_pallas_B{b}_T{t}_H{h}_K{dk}"] = finite
                        print(f"pallas B={b} T={t} bf16: o, final state and all grads finite = {finite}", flush=True)
                        _flush_report()
                except Exception as e:  # noqa: BLE001 - report and go on with the next config
                    print(f"{impl} B={b} T={t} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            # The chunk-local preparation alone, to show where the time goes.
            prep_flops = 2 * b * t * h * (2 * chunk * dk + chunk * (dk + dv) // 2)
            prep_bytes = b * t * h * 2 * (2 * dk + dv + 2 + 3 * dk + dv + chunk)
            for name, (pf, pfb) in prep_fns.items():
                try:
                    row(results, peaks, name, "fwd", b, t, median_time(pf, q, k, v, g, beta), prep_flops, prep_bytes)
                    row(results, peaks, name, "fwd+bwd", b, t, median_time(pfb, q, k, v, g, beta), 3 * prep_flops,
                        3 * prep_bytes)
                except Exception as e:  # noqa: BLE001
                    print(f"{name} B={b} T={t} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if len(prep_fns) > 1:
                try:
                    _compare_prepare(prep_fns, (q, k, v, g, beta), report, f"prepare_vs_xla_B{b}_T{t}_H{h}_K{dk}")
                    _flush_report()
                except Exception as e:  # noqa: BLE001
                    print(f"prepare comparison failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if fla_fn is not None:
                import torch

                tq = [_to_torch(x, True) for x in (q, k, v, g, beta)]
                tdo = _to_torch(do)
                try:
                    time_torch_baseline(results, peaks, "fla", lambda: fla_fn(*tq, output_final_state=True),
                                        lambda: fla_fn(*tq, output_final_state=True)[0].backward(tdo),
                                        b, t, fl, by_f, by_fb)
                except Exception as e:  # noqa: BLE001
                    print(f"fla B={b} T={t} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                del tq, tdo
                torch.cuda.empty_cache()
            del q, k, v, g, beta, do


# --------------------------------------------------------------------------- SSD
SSD_GROUPS = 8  # B, C groups: the teacher's KV heads of Llama-3.2-1B (B <- W_K, C <- W_Q)


def ssd_flops(b, t, h, p, n, c):
    """Forward FLOPs of the chunked SSD per token and head: 2C(N + P) (C B^T, scores x)
    + 4PN (chunk state, state read-out). Forward+backward is counted as 3x forward."""
    return 2 * b * t * h * (c * (n + p) + 2 * p * n)


def ssd_bytes(b, t, h, p, n, g, itemsize=2, backward=False):
    """Fewest bytes: read x (bf16), dt (f32), B, C (bf16), write y (bf16) and the final state
    (f32); the backward reads them and dy again and writes dx, ddt, dB, dC."""
    io = b * t * (h * p * itemsize + h * 4 + 2 * g * n * itemsize)
    y = b * t * h * p * itemsize
    fwd = io + y + 4 * b * h * p * n
    return fwd + (2 * io + y if backward else 0)


def ssd_inputs(b, t, h, p, n, g, seed=0):
    """bf16 x, B, C; f32 dt log-uniform in [1e-3, 0.1] and A = -U(1, 16) (Mamba2's init)."""
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (b, t, h, p), jnp.bfloat16)
    dt = jnp.exp(jax.random.uniform(ks[1], (b, t, h), minval=np.log(1e-3), maxval=np.log(0.1)))
    A = -jax.random.uniform(ks[2], (h,), minval=1.0, maxval=16.0)
    B = (jax.random.normal(ks[3], (b, t, g, n)) / np.sqrt(n)).astype(jnp.bfloat16)
    C = jax.random.normal(ks[4], (b, t, g, n), jnp.bfloat16)
    dy = jax.random.normal(ks[5], (b, t, h, p), jnp.bfloat16)
    return x, dt, A, B, C, dy


def _ssd_jax_fns(impl, chunk):
    from pallas_kernels.ssd import ssd

    return _jit_fwd_and_fwd_bwd(lambda x, dt, A, B, C: ssd(
        x, dt, A, B, C, output_final_state=True, chunk_size=chunk, impl=impl))


def _ssd_torch_fns(chunk):
    """{name: (fwd, fwd_bwd)} over torch tensors for mamba_ssm and fla, where importable."""
    fns = {}
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        def m_fwd(x, dt, A, B, C):
            return mamba_chunk_scan_combined(x, dt, A, B, C, chunk, return_final_states=True)
        fns["mamba_ssm"] = m_fwd
    except Exception as e:  # noqa: BLE001 - any import failure means: not here
        print(f"mamba_ssm not available: {type(e).__name__}: {e}", flush=True)
    try:
        import fla.ops.common.chunk_o as chunk_o
        import torch
        from fla.ops.simple_gla import chunk_simple_gla

        # Its gated backward refuses on Hopper with Triton < 3.7.1 (fla issue #640); bypass the
        # gate to measure it, and check its gradients first (check_ssd) as for the GDN kernel.
        chunk_o.TRITON_ABOVE_3_7_1 = True

        def f_fwd(x, dt, A, B, C):
            # q = C, k = B, v = dt x, g = dt A; fla has no groups, so B, C are per head.
            rep = x.shape[2] // B.shape[2]
            k, q = (torch.repeat_interleave(z, rep, dim=2) for z in (B, C))
            v = (x.float() * dt[..., None]).to(x.dtype)
            return chunk_simple_gla(q, k, v, g=dt * A, scale=1.0, output_final_state=True)
        fns["fla"] = f_fwd
    except Exception as e:  # noqa: BLE001
        print(f"fla not available: {type(e).__name__}: {e}", flush=True)
    return fns


def check_ssd(torch_fns, h=4, p=64, n=128, g=2, t=1000):
    """Our Pallas form and each torch kernel on one bf16 problem vs our float64 reference:
    rel-RMS of y and of dx, ddt, dA, dB, dC (final-state gradient zero)."""
    from pallas_kernels.ssd import ssd, ssd_reference

    x, dt, A, B, C, dy = ssd_inputs(1, t, h, p, n, g, seed=3)
    names = ("y", "dx", "ddt", "dA", "dB", "dC")
    with jax.enable_x64(True):
        a64 = [z.astype(jnp.float64) for z in (x, dt, A, B, C)]
        y_ref, vjp = jax.vjp(lambda *a: ssd_reference(*a)[0], *a64)
        ref = (y_ref, *vjp(dy.astype(jnp.float64)))
    out = {}
    y, vjp = jax.vjp(lambda *a: ssd(*a, impl="pallas")[0], x, dt, A, B, C)
    out["pallas"] = {k: rel_rms(a, r) for k, a, r in zip(names, (y, *vjp(dy)), ref)}
    for name, fn in torch_fns.items():
        try:
            tx = [_to_torch(z, True) for z in (x, dt, A, B, C)]
            res = fn(*tx)
            res[0].backward(_to_torch(dy))
            got = [res[0].detach()] + [z.grad for z in tx]
            out[name] = {k: rel_rms(a.float().cpu().numpy(), r) for k, a, r in zip(names, got, ref)}
        except Exception as e:  # noqa: BLE001
            out[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    print("ssd check (bf16 vs f64 reference, rel-RMS):", json.dumps(out), flush=True)
    return out


def bench_ssd(args, peaks, results, report):
    """SSD with x [B,T,H,P], B/C [B,T,G,N]: --heads H, --dv P, --dk N, G = SSD_GROUPS."""
    chunk = 64
    h, p, n, g = args.heads, args.dv, args.dk, SSD_GROUPS
    torch_fns = {} if args.no_fla else _ssd_torch_fns(chunk)
    start = time.perf_counter()
    fns = {impl: _ssd_jax_fns(impl, chunk) for impl in args.impls}
    for b in args.batch:
        for t in args.seqlen:
            if time.perf_counter() - start > args.time_budget:
                print(f"time budget spent: skipped B={b} T={t}", flush=True)
                report.setdefault("skipped", []).append((b, t))
                continue
            x, dt, A, B, C, dy = ssd_inputs(b, t, h, p, n, g)
            fl = ssd_flops(b, t, h, p, n, chunk)
            by_f, by_fb = ssd_bytes(b, t, h, p, n, g), ssd_bytes(b, t, h, p, n, g, backward=True)
            for impl, (fwd, fwd_bwd) in fns.items():
                try:
                    t0 = time.perf_counter()
                    fwd, fwd_bwd = fwd.lower(x, dt, A, B, C).compile(), fwd_bwd.lower(x, dt, A, B, C, dy).compile()
                    print(f"{impl} B={b} T={t}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
                    row(results, peaks, impl, "fwd", b, t, median_time(fwd, x, dt, A, B, C), fl, by_f)
                    row(results, peaks, impl, "fwd+bwd", b, t, median_time(fwd_bwd, x, dt, A, B, C, dy),
                        3 * fl, by_fb)
                    if t == max(args.seqlen) and impl == "pallas":
                        outs = (*fwd(x, dt, A, B, C), *fwd_bwd(x, dt, A, B, C, dy))
                        finite = bool(all(jnp.isfinite(z.astype(jnp.float32)).all() for z in outs))
                        report[f"ssd_finite_pallas_B{b}_T{t}"] = finite
                        print(f"pallas B={b} T={t} bf16: y, final state and all grads finite = {finite}",
                              flush=True)
                except Exception as e:  # noqa: BLE001 - report and go on with the next config
                    print(f"{impl} B={b} T={t} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if torch_fns:
                import torch

                tx = [_to_torch(z, True) for z in (x, dt, A, B, C)]
                tdy = _to_torch(dy)
                for name, fn in torch_fns.items():
                    try:
                        time_torch_baseline(results, peaks, name, lambda: fn(*tx), lambda: fn(*tx)[0].backward(tdy),
                                            b, t, fl, by_f, by_fb)
                    except Exception as e:  # noqa: BLE001
                        print(f"{name} B={b} T={t} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                del tx, tdy
                torch.cuda.empty_cache()
            del x, dt, A, B, C, dy
    report["ssd_check"] = check_ssd(torch_fns)


SECTIONS = {"gdn": bench_gdn, "ssd": bench_ssd}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=sorted(SECTIONS), default="gdn")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--seqlen", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    # Defaults: the GDN layers of Llama-3.2-1B upcycled as here (heads = teacher query heads, K = V = head_dim).
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dk", type=int, default=64)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--impls", nargs="+", default=["pallas", "xla"],
                   help="gdn: pallas, xla, reference, pallas-xla-prepare; ssd: pallas, xla, reference")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--no-prepare", action="store_true",
                   help="gdn: skip the rows that time the chunk-local preparation alone")
    p.add_argument("--no-check", action="store_true", help="skip the accuracy check of our Pallas form")
    p.add_argument("--markdown", default=None, help="append one table row per measurement to this file")
    p.add_argument("--tune", nargs="*", choices=["prepare", "recurrence"],
                   help="first sweep the launch parameters of our GPU kernels (gdn), at the first --batch: "
                        "the chunk-local `gpu_prepare` kernels' warps (reported only), the walks' V block "
                        "and warps (the fastest is kept), or both (no argument)")
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds; later configs are skipped")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = jax.devices()[0]
    peaks = measure_peaks()
    report = {"device": dev.device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv), "peak_bf16_tflops": peaks[0] / 1e12, "copy_gbps": peaks[1] / 1e9}
    print(json.dumps(report), flush=True)
    results = report["results"] = []
    _SINK.update(markdown=args.markdown, json=args.json, report=report)
    _flush_report()
    SECTIONS[args.op](args, peaks, results, report)
    _flush_report()


if __name__ == "__main__":
    main()
