"""`kernels --op gdn`: the gated delta rule (pallas_kernels.gated_delta_rule) on one device.

Rows per (impl, pass, B, T): our Pallas and XLA forms ("pallas-xla-prepare": the Pallas
form with its chunk-local part in XLA), the chunk-local preparation alone
("prepare-xla", and "prepare-pallas" on GPU) and, where importable, flash-linear-
attention's Triton chunk_gated_delta_rule ("fla": triton's do_bench; "fla-piped": timed
as ours). Each row has the median time, TFLOP/s under `flops` and the fraction of the
roofline floor max(flops / peak matmul rate, fewest bytes / copy bandwidth) reached,
with both peaks measured on the device at start.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from tools.bench.harness import (
    Column, Report, jit_fwd_and_fwd_bwd, measure_peaks, median_time, rel_rms, to_torch, torch_times,
)

CHUNK = 64
COLUMNS = (Column("impl", "impl"), Column("pass", "pass"), Column("B", "B"), Column("T", "T"), Column("H", "H"),
           Column("K", "K"), Column("V", "V"), Column("ms", "ms", "{:.3f}"), Column("tflops", "TFLOP/s", "{:.2f}"),
           Column("roofline", "roofline", "{:.1%}"), Column("note", "note"))


def flops(b, t, h, dk, dv, c):
    """Forward FLOPs of the chunked algorithm: per token and head 4CK (K K^T, Q K^T),
    C(K+V) (triangular solve on [C, K+V]), 6KV (w S, q S, state update), 2CV (Aqk v_new).
    Forward+backward is counted as 3x forward (the usual convention)."""
    return 2 * b * t * h * (2 * c * dk + c * (dk + dv) // 2 + 3 * dk * dv + c * dv)


def min_bytes(b, t, h, dk, dv, itemsize=2, backward=False):
    """Fewest bytes: read q, k, v (bf16), g (f32), beta (bf16), write o (bf16) and the final
    state (f32); the backward also reads them and do, and writes dq, dk, dv, dg, dbeta."""
    io = b * t * h * (itemsize * (2 * dk + dv + 1) + 4)
    fwd = io + b * t * h * dv * itemsize + 4 * b * h * dk * dv
    return fwd + (2 * io + b * t * h * dv * itemsize if backward else 0)


def inputs(b, t, h, dk, dv, seed=0):
    """bf16 q, k (L2-normalised), v, beta; float32 log-decay g; bf16 output cotangent."""
    ks = jax.random.split(jax.random.key(seed), 6)
    l2 = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = l2(jax.random.normal(ks[0], (b, t, h, dk))).astype(jnp.bfloat16)
    k = l2(jax.random.normal(ks[1], (b, t, h, dk))).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, h, dv), jnp.bfloat16)
    g = jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[3], (b, t, h)) + 3.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h))).astype(jnp.bfloat16)
    do = jax.random.normal(ks[5], (b, t, h, dv), jnp.bfloat16)
    return q, k, v, g, beta, do


def op_fns(impl, block_sizes):
    """(jit fwd, jit fwd+bwd) of one form: "pallas" (under `block_sizes`), "pallas-xla-prepare"
    (the Pallas form with its chunk-local part in XLA), "xla" or "reference"."""
    from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule, chunk_gated_delta_rule_pallas

    kw = dict(output_final_state=True, chunk_size=CHUNK)
    if impl in ("pallas", "pallas-xla-prepare"):
        prepare_impl = "xla" if impl == "pallas-xla-prepare" else None
        return jit_fwd_and_fwd_bwd(lambda q, k, v, g, beta: chunk_gated_delta_rule_pallas(
            q, k, v, g, beta, prepare_impl=prepare_impl, block_sizes=block_sizes, **kw))
    return jit_fwd_and_fwd_bwd(lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta, impl=impl, **kw))


def fla_op():
    """flash-linear-attention's chunk_gated_delta_rule, or None when it is not installed."""
    try:
        import torch  # noqa: F401
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as e:  # noqa: BLE001 - any import failure means: no fla here
        print(f"fla not available: {type(e).__name__}: {e}", flush=True)
        return None
    return chunk_gated_delta_rule


def _reference_errors(got_o, got_grads, q, k, v, g, beta, do):
    """rel-RMS of an output and its gradients (dq, dk, dv, dg, dbeta) against the float64 per-step reference."""
    from pallas_kernels.gated_delta_rule import fused_recurrent_gated_delta_rule

    with jax.enable_x64(True):
        args64 = [x.astype(jnp.float64) for x in (q, k, v, g, beta)]
        o_ref, vjp = jax.vjp(lambda *a: fused_recurrent_gated_delta_rule(*a)[0], *args64)
        grads_ref = vjp(do.astype(jnp.float64))
        errs = {"o": rel_rms(got_o, o_ref)}
        errs.update({n: rel_rms(a, b) for n, a, b in zip(("dq", "dk", "dv", "dg", "dbeta"), got_grads, grads_ref)})
    return errs


def check_fla(fla_fn, h, dk, dv, t=1000):
    """fla's output and gradients vs our float64 per-step reference; also whether its gated
    backward refuses on this Triton/Hopper without the TRITON_ABOVE_3_7_1 override."""
    import fla.ops.common.chunk_o as chunk_o
    import torch

    q, k, v, g, beta, do = inputs(1, t, h, dk, dv, seed=3)
    tq = [to_torch(x, True) for x in (q, k, v, g, beta)]
    tdo = to_torch(do)
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
    errs = _reference_errors(o.detach().float().cpu().numpy(), [x.grad.float().cpu().numpy() for x in tq],
                             q, k, v, g, beta, do)
    status["rel_rms_vs_f64_reference"] = errs
    status["gradients_ok(<=2e-2)"] = bool(all(e <= 2e-2 for e in errs.values()))
    return status


def check_ours(h, dk, dv, block_sizes, t=1000):
    """Our Pallas form on the same bf16 problem as check_fla, vs the float64 reference."""
    from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule_pallas

    q, k, v, g, beta, do = inputs(1, t, h, dk, dv, seed=3)
    o, vjp = jax.vjp(lambda *a: chunk_gated_delta_rule_pallas(*a, block_sizes=block_sizes)[0], q, k, v, g, beta)
    return _reference_errors(o, vjp(do), q, k, v, g, beta, do)


def prepare_fns(scale, block_sizes):
    """{name: (jit fwd, jit fwd+bwd)} of the chunk-local preparation alone: "prepare-xla"
    (xla.prepare) and, on GPU, the chunk-local kernels ("prepare-pallas")."""
    from pallas_kernels.gated_delta_rule import gpu_chunk_local
    from pallas_kernels.gated_delta_rule.xla import prepare

    kw = dict(scale=scale, segment_ids=None, chunk_size=CHUNK)

    def fns_of(fn):
        def fwd_bwd(*a):
            out, vjp = jax.vjp(lambda *x: fn(*x, **kw), *a)
            return vjp(out)  # the outputs themselves as cotangents: same shapes, no extra inputs

        return jax.jit(lambda *a: fn(*a, **kw)), jax.jit(fwd_bwd)

    fns = {"prepare-xla": fns_of(prepare)}
    if jax.default_backend() == "gpu":
        fns["prepare-pallas"] = fns_of(lambda *a, **k: gpu_chunk_local.prepare(*a, block_sizes=block_sizes, **k))
    return fns


def compare_prepare(fns, args):
    """rel-RMS of each prepare variant's outputs vs xla.prepare's."""
    base = fns["prepare-xla"][0](*args)
    return {name: {f: rel_rms(np.asarray(a, np.float32), np.asarray(b, np.float32))
                   for f, a, b in zip(base._fields, pf(*args), base)}
            for name, (pf, _) in fns.items() if name != "prepare-xla"}


def _sweep(args, base, changes, what, t):
    """Time the Pallas op, fwd and fwd+bwd, at the first --batch and T = t under each of
    `changes` (dicts of BlockSizes fields) applied to `base`: [(fwd+bwd s, fwd s, BlockSizes)]."""
    b = args.batch[0]
    q, k, v, g, beta, do = inputs(b, t, args.heads, args.dk, args.dv)
    timings = []
    for change in changes:
        bs = dataclasses.replace(base, **change)
        fwd, fwd_bwd = op_fns("pallas", bs)
        try:
            tf = median_time(fwd, q, k, v, g, beta)
            tfb = median_time(fwd_bwd, q, k, v, g, beta, do)
        except Exception as e:  # noqa: BLE001 - a launch configuration may not compile; try the next
            print(f"tune {what} {change} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        timings.append((tfb, tf, bs))
        print(f"tune {what} B={b} T={t} {change}: fwd {tf * 1e3:.3f} ms, fwd+bwd {tfb * 1e3:.3f} ms", flush=True)
    return timings


def tune_recurrence(args, base, report, t=8192):
    """Sweep the walks' V block and warps; return the BlockSizes of the fastest fwd+bwd."""
    changes = [dict(walk_block_v=bv, walk_warps=w) for bv in (16, 32, 64) for w in (2, 4, 8)]
    timings = _sweep(args, base, changes, "recurrence", t)
    best = min(timings, key=lambda x: x[0])[2]
    report.add("tuning", [dict(dataclasses.asdict(bs), fwd_ms=tf * 1e3, fwd_bwd_ms=tfb * 1e3)
                          for tfb, tf, bs in timings])
    report.add("tuned_block_sizes", dataclasses.asdict(best))
    return best


def tune_prepare(args, base, report, t=16384):
    """Time the whole op with each chunk-local kernel's warps at 2, 4 and 8 in turn (the
    others as in `base`): a report, the timings below keep `base`."""
    fields = ("aqk_qg_warps", "wy_warps", "output_warps", "prepare_bwd_warps")
    timings = _sweep(args, base, [{f: w} for f in fields for w in (2, 4, 8)], "prepare", t)
    report.add("prepare_tuning", [dict(dataclasses.asdict(bs), fwd_ms=tf * 1e3, fwd_bwd_ms=tfb * 1e3)
                                  for tfb, tf, bs in timings])


def run(args):
    from pallas_kernels.gated_delta_rule import BlockSizes

    h, dk, dv = args.heads, args.dk, args.dv
    report = Report(COLUMNS, args.json, args.markdown)
    peaks = measure_peaks()
    report.add("peaks", {"bf16_tflops": peaks[0] / 1e12, "copy_gbps": peaks[1] / 1e9})
    block_sizes = BlockSizes(**args.block_sizes)

    def row(impl, mode, b, t, seconds, fl, nbytes):
        floor = max(fl / peaks[0], nbytes / peaks[1])
        report.row(**{"impl": impl, "pass": mode}, B=b, T=t, H=h, K=dk, V=dv, chunk=CHUNK, ms=seconds * 1e3,
                   tflops=fl / seconds / 1e12, roofline=floor / seconds)

    fla_fn = None if args.no_fla else fla_op()
    # Checks at the benchmark's H, K, V, so fla's autotuning there serves the timings too.
    if not args.no_check:
        report.add("gdn_ours_check", check_ours(h, dk, dv, block_sizes))
    if fla_fn is not None:
        report.add("gdn_fla_check", check_fla(fla_fn, h, dk, dv))
    tune = set(args.tune or ()) or ({"prepare", "recurrence"} if args.tune is not None else set())
    if "pallas" in args.impls and "prepare" in tune:
        tune_prepare(args, block_sizes, report)
    if "pallas" in args.impls and "recurrence" in tune:
        block_sizes = tune_recurrence(args, block_sizes, report)
    start = time.perf_counter()
    fns = {impl: op_fns(impl, block_sizes) for impl in args.impls}
    prep_fns = prepare_fns(dk**-0.5, block_sizes) if "pallas" in fns and not args.no_prepare else {}
    for b in args.batch:
        for t in args.seqlen:
            if time.perf_counter() - start > args.time_budget:
                print(f"time budget spent: skipped B={b} T={t}", flush=True)
                report.data.setdefault("skipped", []).append((b, t))
                continue
            q, k, v, g, beta, do = inputs(b, t, h, dk, dv)
            fl = flops(b, t, h, dk, dv, CHUNK)
            by_f, by_fb = min_bytes(b, t, h, dk, dv), min_bytes(b, t, h, dk, dv, backward=True)
            for impl, (fwd, fwd_bwd) in fns.items():
                try:
                    row(impl, "fwd", b, t, median_time(fwd, q, k, v, g, beta), fl, by_f)
                    row(impl, "fwd+bwd", b, t, median_time(fwd_bwd, q, k, v, g, beta, do), 3 * fl, by_fb)
                    if t == max(args.seqlen) and impl == "pallas":
                        o, s = fwd(q, k, v, g, beta)
                        grads = fwd_bwd(q, k, v, g, beta, do)
                        finite = bool(all(jnp.isfinite(x.astype(jnp.float32)).all() for x in (o, s, *grads)))
                        report.add(f"finite_pallas_B{b}_T{t}_H{h}_K{dk}", finite)
                except Exception as e:  # noqa: BLE001 - report and go on with the next config
                    report.fail(f"{impl} B={b} T={t}", e)
            # The chunk-local preparation alone, to show where the time goes.
            prep_flops = 2 * b * t * h * (2 * CHUNK * dk + CHUNK * (dk + dv) // 2)
            prep_bytes = b * t * h * 2 * (2 * dk + dv + 2 + 3 * dk + dv + CHUNK)
            for name, (pf, pfb) in prep_fns.items():
                try:
                    row(name, "fwd", b, t, median_time(pf, q, k, v, g, beta), prep_flops, prep_bytes)
                    row(name, "fwd+bwd", b, t, median_time(pfb, q, k, v, g, beta), 3 * prep_flops, 3 * prep_bytes)
                except Exception as e:  # noqa: BLE001
                    report.fail(f"{name} B={b} T={t}", e)
            if len(prep_fns) > 1:
                try:
                    report.add(f"prepare_vs_xla_B{b}_T{t}_H{h}_K{dk}", compare_prepare(prep_fns, (q, k, v, g, beta)))
                except Exception as e:  # noqa: BLE001
                    report.fail("prepare comparison", e)
            if fla_fn is not None:
                import torch

                tq = [to_torch(x, True) for x in (q, k, v, g, beta)]
                tdo = to_torch(do)
                calls = {"fwd": lambda: fla_fn(*tq, output_final_state=True),
                         "fwd+bwd": lambda: fla_fn(*tq, output_final_state=True)[0].backward(tdo)}
                try:
                    for mode, call in calls.items():
                        bench, piped = torch_times(call, grad=mode == "fwd+bwd")
                        fl_m, by_m = (fl, by_f) if mode == "fwd" else (3 * fl, by_fb)
                        row("fla", mode, b, t, bench, fl_m, by_m)
                        row("fla-piped", mode, b, t, piped, fl_m, by_m)
                except Exception as e:  # noqa: BLE001
                    report.fail(f"fla B={b} T={t}", e)
                del tq, tdo
                torch.cuda.empty_cache()
            del q, k, v, g, beta, do
    print(json.dumps({"block_sizes": dataclasses.asdict(block_sizes)}), flush=True)
