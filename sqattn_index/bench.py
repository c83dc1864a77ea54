"""Benchmark: squeezed decode / prefill attention (centroid lookup + sparse attention) against dense SDPA.

    python -m sqattn_index.bench --out docs/bench            # full table on a CUDA GPU
    python -m sqattn_index.bench --contexts 131072 --keeps 0.1 --no-clustering   # one point

One fixed-context layer is synthesised directly in the clustered layout (``corpus_kv``): keys with a
coarse / fine cluster structure (fine clusters of 16 keys, coarse clusters of 16 fine ones), sinks and an
observation window. Thresholds are calibrated on the measured queries so that the kept fraction of the
fixed context (sinks and window included) equals ``keep``; the lookup then decides in-kernel (threshold mode).
Times are CUDA-event medians of CUDA-graph replays with the L2 cache flushed before each replay; dense is the
fastest SDPA backend measured (flash / cuDNN / efficient, GQA native or with expanded K/V).
Rows go to ``OUT/results.json`` and a plot to ``OUT/speedup.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

# The workload lives in bench_workload; the scripts in benchmarks/ import it from here.
from .bench_workload import (  # noqa: F401
    SHAPES,
    BenchConfig,
    Timer,
    best_dense,
    calibrate,
    copy_bandwidth,
    estimate_kwargs,
    make_queries,
    squeezed_fns,
    synthetic_layer,
)

__all__ = ["main", "BenchConfig", "SHAPES"]


# ----------------------------------------------------------------------------------------------- measurement helpers


def profile_step(step, log) -> None:
    """Per-kernel device times of a few eager squeezed steps (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))


def sweep_sparse(q, layer, pos, total, scale, timer: Timer, kv_bytes: int, log) -> None:
    """Time launch settings of the sparse attention kernel (the first one is the default)."""
    from .kernels.sparse_attention import _auto_splits, _config, sparse_attention_positions

    b, hq, t, d = q.shape
    hk = layer.keys.shape[0]
    nq = (hq // hk) * t
    base = _config(nq, d, q.device)
    auto = _auto_splits(triton_cdiv(nq, base["BLOCK_M"]) * b * hk, layer.keys.shape[1], base["BLOCK_N"], q.device)
    if nq <= 16:
        grid = [dict(BLOCK_N=bn, num_stages=st, num_warps=w) for bn in (32, 64, 128) for st in (2, 3, 4)
                for w in (4, 8)]
        splits = (auto, 2 * auto, 4 * auto, max(auto // 2, 1))
    else:
        grid = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st) for bm in (64, 128) for bn in (64, 128)
                for w in (4, 8) for st in (2, 3)]
        splits = (auto, 1, 2 * auto)
    results = []
    for sp in splits:
        for over in grid if sp == auto else [{}]:
            try:
                ms = timer(lambda: sparse_attention_positions(q, layer.keys, layer.values, pos, total, scale,
                                                              num_splits=sp, config=over))
            except Exception as exc:  # out of resources for this tile
                log(f"    sweep splits={sp} {over}: {type(exc).__name__}")
                continue
            results.append((ms, sp, over))
    for ms, sp, over in sorted(results, key=lambda r: r[0])[:8]:
        log(f"    sweep {ms:.4f} ms {kv_bytes / (ms * 1e6):5.0f} GB/s splits={sp} {over or 'default'}")


def sweep_lookup(lookup, timer: Timer, log, prefill: bool = False) -> None:
    """Time launch settings of the lookup kernels; keep the fastest for the rest of the run."""
    from .kernels import lookup as lk

    default = dict(lk.TUNING)
    if prefill:
        variants = [default] + [dict(parent_group_prefill=g, parent_warps_prefill=w) for g in (4, 8, 16, 32)
                                for w in (2, 4)]
    else:
        variants = [default] + [dict(block_c=bc, block_warps=bw, parent_warps=pw, parent_group=g)
                                for bc, bw, pw, g in ((32, 2, 2, 1), (32, 2, 2, 4), (32, 2, 4, 2), (64, 4, 2, 2),
                                                      (32, 2, 1, 4), (32, 2, 1, 8))]
    results = []
    for v in variants:
        lk.TUNING.update(v)
        try:
            results.append((timer(lookup), v))
        except Exception as exc:  # noqa: BLE001 - report and go on
            log(f"    lookup sweep {v}: {type(exc).__name__}")
    results.sort(key=lambda r: r[0])
    for ms, v in results:
        log(f"    lookup sweep {ms:.4f} ms {v}")
    lk.TUNING.update(results[0][1])
    log(f"    lookup tuning kept: {lk.TUNING}")


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------- the table


def run_shape_context(shape: str, n: int, cfg: BenchConfig, timer: Timer, copy_gbps: float, device_name: str,
                      log) -> list[dict]:
    from .kernels.reference import ranges_from_mask_ref, sparse_attention_ref
    from .kernels.sparse_attention import sparse_attention_positions

    hq, hk, d = SHAPES[shape]
    dev = timer.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    scale = d ** -0.5
    layer = synthetic_layer(hk, n, d, dtype, dev, cfg, seed=n + hk)
    elt = layer.keys.element_size()
    kv_row = 2 * d * elt  # K and V bytes of one kept key
    rows = []
    row = lambda **kw: dict(shape=shape, context=n, device=device_name, copy_gbps=copy_gbps,  # noqa: E731
                            lookup="flat" if cfg.flat_decode and kw["phase"].startswith("decode") else "hierarchical",
                            centroids="fp8" if cfg.fp8_centroids and kw["phase"].startswith("decode") else "bf16",
                            **kw)
    for phase, t in (("decode", 1), ("prefill", cfg.prefill_tokens)):
        q = make_queries(layer, hq, t, seed=t)
        qg = q.reshape(1, hk, (hq // hk) * t, d)
        dense_ms, dense_name = best_dense(q, layer, timer, log)
        log(f"  {shape} N={n} {phase}: dense {dense_name} {dense_ms:.3f} ms "
            f"({2 * layer.keys.numel() * elt / (dense_ms * 1e6):.0f} GB/s on K+V)")
        precision = "ieee" if phase == "decode" else "tf32"
        hier = not (cfg.flat_decode and phase == "decode")
        for keep in cfg.keeps:
            fthr, cthr = calibrate(layer, qg, keep, cfg, scale, hier)
            budgets = None
            if cfg.selection == "budget":
                fine_budget = torch.full((1, hk), max(keep * n - layer.sink - layer.window, 0.0), device=dev)
                budgets = (fine_budget, (fine_budget * cfg.coarse_slack).clamp(max=float(n)))
            fp8 = cfg.fp8_centroids and phase == "decode"
            step, lookup = squeezed_fns(layer, q, fthr, cthr, scale, precision, cfg.estimate, budgets, hier, fp8)
            keep_mask, read, pos, total = lookup()
            kept = int(total.sum())
            kv_bytes = kept * kv_row
            spread_bytes = 4 if cfg.estimate == "full" else 0
            cent_bytes = int(read.sum()) * (d * (1 if fp8 else layer.fine_centroids.element_size()) + spread_bytes)
            if n <= 32768 and shape == cfg.shapes[0]:  # spot check against the torch reference
                out, _ = step()
                s, e, c = ranges_from_mask_ref(keep_mask, layer.fine_offsets, n, layer.sink, layer.window)
                rout, _ = sparse_attention_ref(q, layer.keys, layer.values, s, e, c, scale)
                err = float((out.double() - rout.double()).norm() / rout.double().norm())
                log(f"    check vs reference: rel RMS {err:.2e}")
            sq_ms = timer(step)
            look_ms = timer(lookup)
            log(f"    keep {keep}: kept {kept / (hk * n):.4f} of K/V, centroids read {int(read.sum())}, "
                f"squeezed {sq_ms:.3f} ms (lookup {look_ms:.3f}) speedup {dense_ms / sq_ms:.2f}x")
            if keep == cfg.keeps[0] and n == cfg.contexts[0]:
                if cfg.profile and dev.type == "cuda":
                    profile_step(step, log)
                if cfg.sweep and dev.type == "cuda":
                    sweep_sparse(q, layer, pos, total, scale, timer, kv_bytes, log)
                    sweep_lookup(lookup, timer, log, prefill=phase == "prefill")
                    look_ms = timer(lookup)
                    sq_ms = timer(step)
            rows.append(row(phase=phase, keep=keep, dense_ms=dense_ms, squeezed_ms=sq_ms,
                            speedup=dense_ms / sq_ms, achieved_gbps=(kv_bytes + cent_bytes) / (sq_ms * 1e6)))
            if phase == "decode":
                sp_ms = timer(lambda: sparse_attention_positions(q, layer.keys, layer.values, pos, total, scale))
                log(f"    sparse attention alone {sp_ms:.3f} ms: {kv_bytes / (sp_ms * 1e6):.0f} GB/s of K/V read "
                    f"({kv_bytes / (sp_ms * 1e6) / max(copy_gbps, 1e-9):.0%} of copy)")
                rows.append(row(phase="decode-sparse-kernel", keep=keep, dense_ms=dense_ms, squeezed_ms=sp_ms,
                                speedup=dense_ms / sp_ms, achieved_gbps=kv_bytes / (sp_ms * 1e6)))
    del layer
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def clustering_row(cfg: BenchConfig, timer: Timer, device_name: str, copy_gbps: float, log) -> dict | None:
    """Seconds to cluster a 128K-token context: one layer of 8 KV heads timed, times 32 layers."""
    try:
        from .clustering import build_layer_clusters
    except ImportError:
        log("  clustering: sqattn_index.clustering.build_layer_clusters not available, row skipped")
        return None
    dev = timer.device
    n = 131072 if dev.type == "cuda" else 2048
    layer = synthetic_layer(8, n, 128, torch.bfloat16 if dev.type == "cuda" else torch.float32, dev, cfg, seed=1)
    keys, values = layer.keys, layer.values
    perm = torch.randperm(n, device=dev)
    keys, values = keys[:, perm].contiguous(), values[:, perm].contiguous()  # original order: unclustered
    del layer
    build_layer_clusters(keys[:, :4096], values[:, :4096], cfg.sink, cfg.window)  # warm up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    build_layer_clusters(keys, values, cfg.sink, cfg.window, cfg.keys_per_fine, cfg.fine_per_coarse)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    one = time.perf_counter() - t0
    log(f"  clustering: one layer of 8 KV heads x {n} tokens {one:.2f} s; 32 layers {32 * one:.1f} s")
    return dict(phase="clustering", shape="llama3-8b x 32 layers", context=n, keep=None, dense_ms=None,
                squeezed_ms=32 * one * 1e3, speedup=None, achieved_gbps=None, copy_gbps=copy_gbps,
                device=device_name)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(p, s) for p in ("decode", "prefill") for s in sorted({r["shape"] for r in rows if r["phase"] == p})]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (phase, shape) in zip(axes[0], panels):
        sel = [r for r in rows if r["phase"] == phase and r["shape"] == shape]
        contexts = sorted({r["context"] for r in sel})
        keeps = sorted({r["keep"] for r in sel})
        width = 0.8 / max(len(keeps), 1)
        for i, keep in enumerate(keeps):
            ys = [next((r["speedup"] for r in sel if r["context"] == c and r["keep"] == keep), 0) for c in contexts]
            ax.bar([j + i * width for j in range(len(contexts))], ys, width, label=f"keep {keep:g}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(contexts))])
        ax.set_xticklabels([f"{c // 1024}K" for c in contexts])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{phase}, {shape}")
        ax.set_xlabel("fixed context")
        ax.set_ylabel("speedup over dense SDPA")
        ax.legend(fontsize=8)
    fig.suptitle(f"Squeezed attention vs dense SDPA ({rows[0]['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def parse_args(argv) -> BenchConfig:
    p = argparse.ArgumentParser(prog="sqattn bench", description=__doc__.split("\n")[0])
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    floats = lambda s: tuple(float(x) for x in s.split(","))  # noqa: E731
    p.add_argument("--contexts", type=ints, default=BenchConfig.contexts, help="fixed-context tokens, comma list")
    p.add_argument("--keeps", type=floats, default=BenchConfig.keeps, help="kept fractions, comma list")
    p.add_argument("--shapes", type=lambda s: tuple(s.split(",")), default=BenchConfig.shapes,
                   help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--prefill-tokens", type=int, default=BenchConfig.prefill_tokens)
    p.add_argument("--reps", type=int, default=BenchConfig.reps)
    p.add_argument("--no-clustering", dest="clustering", action="store_false")
    p.add_argument("--sweep", action="store_true", help="tune the sparse kernel at the first context")
    p.add_argument("--profile", action="store_true", help="per-kernel profile at the first context")
    p.add_argument("--append", action="store_true", help="merge into an existing OUT/results.json")
    p.add_argument("--out", default=BenchConfig.out, help="folder for results.json and speedup.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--selection", choices=("threshold", "budget"), default=BenchConfig.selection,
                   help="lookup decisions: calibrated thresholds in-kernel, or top clusters by budget (torch sort)")
    p.add_argument("--flat-decode", action="store_true",
                   help="decode rows with a flat lookup over every fine centroid (prefill stays hierarchical)")
    p.add_argument("--fp8-centroids", action="store_true",
                   help="decode rows: the lookup scores 8-bit centroid tables (SqueezeConfig.centroid_precision)")
    p.add_argument("--estimate", choices=("full", "plain"), default=BenchConfig.estimate,
                   help="lookup estimate: full (variance term + exact sink/window normaliser, as the engine) or "
                        "plain (centroid only)")
    a = p.parse_args(argv)
    for s in a.shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; known: {sorted(SHAPES)}")
    return BenchConfig(contexts=a.contexts, keeps=a.keeps, shapes=a.shapes, prefill_tokens=a.prefill_tokens,
                       reps=a.reps, clustering=a.clustering, out=a.out, device=a.device,
                       sweep=a.sweep, profile=a.profile, append=a.append, estimate=a.estimate,
                       selection=a.selection, flat_decode=a.flat_decode, fp8_centroids=a.fp8_centroids)


def main(argv=None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    dev = torch.device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    timer = Timer(dev, cfg.reps)
    copy_gbps = copy_bandwidth(dev, timer)
    log(f"device {device_name}, torch {torch.__version__}; copy {copy_gbps:.0f} GB/s (read + write)")
    rows = [dict(phase="copy", shape="-", context=None, keep=None, dense_ms=None, squeezed_ms=None, speedup=None,
                 achieved_gbps=None, copy_gbps=copy_gbps, device=device_name)]
    old = []
    if cfg.append and (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text())
    key = lambda r: (r["phase"], r["shape"], r["context"], r["keep"])  # noqa: E731

    def merged(new):
        fresh = {key(r) for r in new}
        return [r for r in old if key(r) not in fresh] + new
    for shape in cfg.shapes:
        for n in cfg.contexts:
            rows += run_shape_context(shape, n, cfg, timer, copy_gbps, device_name, log)
            (out / "results.json").write_text(json.dumps(merged(rows), indent=1))
    if plot(merged(rows), out / "speedup.png"):
        log(f"wrote {out / 'speedup.png'}")
    if cfg.clustering:
        try:
            r = clustering_row(cfg, timer, device_name, copy_gbps, log)
        except torch.cuda.OutOfMemoryError as exc:
            log(f"  clustering: out of memory ({exc})")
            r = None
        if r:
            rows.append(r)
    rows = merged(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    log(f"wrote {out / 'results.json'}")
    log(f"{'phase':22s} {'shape':10s} {'context':>8s} {'keep':>5s} {'dense':>8s} {'squeezed':>9s} "
        f"{'speedup':>7s} {'GB/s':>6s}")
    for r in rows:
        if r["phase"] in ("copy", "clustering"):
            continue
        num = lambda key, spec: "-" if r.get(key) is None else format(r[key], spec)  # noqa: E731
        log(f"{r['phase']:22s} {r['shape']:10s} {num('context', '8d'):>8s} {num('keep', '5.2f'):>5s} "
            f"{num('dense_ms', '8.3f'):>8s} {num('squeezed_ms', '9.3f'):>9s} {num('speedup', '7.2f'):>7s} "
            f"{num('achieved_gbps', '6.0f'):>6s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
