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
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["main", "BenchConfig", "SHAPES"]

SHAPES = {"llama3-8b": (32, 8, 128), "llama2-7b": (32, 32, 128), "tiny": (4, 2, 64)}  # (Hq, Hk, D)


@dataclass
class BenchConfig:
    """What to measure (see ``main`` for the command line)."""

    contexts: tuple[int, ...] = (32768, 131072, 524288)
    keeps: tuple[float, ...] = (0.05, 0.1, 0.2)
    shapes: tuple[str, ...] = ("llama3-8b", "llama2-7b")
    prefill_tokens: int = 512
    reps: int = 25
    sink: int = 4
    window: int = 64
    keys_per_fine: int = 16
    fine_per_coarse: int = 16
    coarse_slack: float = 3.0
    estimate: str = "full"  # "full": variance term + exact sink/window normaliser (the engine's); "plain"
    selection: str = "threshold"  # "threshold": in-kernel decisions; "budget": top clusters (torch sort)
    flat_decode: bool = False  # decode rows: flat lookup over every fine centroid (prefill stays hierarchical)
    clustering: bool = True
    sweep: bool = False  # time launch settings of the sparse kernel at the first context, keep 0.1
    profile: bool = False  # print a per-kernel profile of the squeezed step at the first context, keep 0.1
    append: bool = False  # merge into an existing results.json (same phase/shape/context/keep replaced)
    out: str = "docs/bench"
    device: str = "cuda"
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- timing


class Timer:
    """Median time in ms of a step: CUDA-graph replays between CUDA events, L2 flushed before each."""

    def __init__(self, device: torch.device, reps: int):
        self.device, self.reps = device, reps
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if self.cuda else None

    def __call__(self, fn, graph: bool = True) -> float:
        for _ in range(2):
            fn()
        if not self.cuda:
            ts = []
            for _ in range(max(self.reps // 5, 1)):
                t0 = time.perf_counter()
                fn()
                ts.append(1e3 * (time.perf_counter() - t0))
            return statistics.median(ts)
        torch.cuda.synchronize()
        run = fn
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
            run()
        events = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """GB/s of a device-to-device clone of a 2 GiB buffer, counting bytes read plus bytes written."""
    if device.type != "cuda":
        return 0.0
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device=device).random_()
    ms = timer(lambda: src.clone(), graph=False)
    del src
    return 2 * 2 * 2**30 / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------- synthetic layer


@dataclass
class Layer:
    keys: torch.Tensor  # [Hk, N, D]
    values: torch.Tensor
    fine_centroids: torch.Tensor  # [Hk, Cf, D] (model dtype, as build_layer_clusters stores them)
    fine_sizes: torch.Tensor
    fine_offsets: torch.Tensor
    coarse_centroids: torch.Tensor
    coarse_sizes: torch.Tensor
    coarse_offsets: torch.Tensor
    sink: int
    window: int
    fine_spread: torch.Tensor | None = None  # [Hk, Cf] float32
    coarse_spread: torch.Tensor | None = None


def synthetic_layer(hk: int, n: int, d: int, dtype, device, cfg: BenchConfig, seed: int = 0) -> Layer:
    """A clustered layer: coarse centres, fine centres around them, keys around the fine centres."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sink, window = cfg.sink, cfg.window
    m = n - sink - window
    cf = max(1, m // cfg.keys_per_fine)
    cc = max(1, cf // cfg.fine_per_coarse)
    fine_sizes = torch.full((cf,), cfg.keys_per_fine, dtype=torch.int64, device=device)
    fine_sizes[-1] += m - cf * cfg.keys_per_fine
    fine_per = torch.full((cc,), cfg.fine_per_coarse, dtype=torch.int64, device=device)
    fine_per[-1] += cf - cc * cfg.fine_per_coarse
    coarse_offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), fine_per.cumsum(0)])
    fine_offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), fine_sizes.cumsum(0)]) + sink
    keys = torch.empty(hk, n, d, dtype=dtype, device=device)
    fine_c = torch.empty(hk, cf, d, dtype=torch.float32, device=device)
    for h in range(hk):  # one head at a time keeps the float32 temporaries small
        coarse = torch.randn(cc, d, generator=gen, device=device)
        fine = coarse.repeat_interleave(fine_per, 0) + 0.5 * torch.randn(cf, d, generator=gen, device=device)
        k = fine.repeat_interleave(fine_sizes, 0) + 0.5 * torch.randn(m, d, generator=gen, device=device)
        keys[h, sink:n - window] = k.to(dtype)
        keys[h, :sink] = torch.randn(sink, d, generator=gen, device=device).to(dtype)
        keys[h, n - window:] = torch.randn(window, d, generator=gen, device=device).to(dtype)
        fine_c[h] = torch.zeros(cf, d, device=device).index_add_(
            0, torch.arange(cf, device=device).repeat_interleave(fine_sizes), keys[h, sink:n - window].float()
        ) / fine_sizes.unsqueeze(-1)
    values = torch.randn(hk, n, d, generator=gen, device=device).to(dtype)
    w = fine_sizes.float().unsqueeze(-1)
    parent = torch.arange(cc, device=device).repeat_interleave(fine_per)
    coarse_sizes = torch.zeros(cc, dtype=torch.int64, device=device).index_add_(0, parent, fine_sizes)
    coarse_c = torch.zeros(hk, cc, d, device=device).index_add_(1, parent, fine_c * w) / coarse_sizes.view(1, cc, 1)
    ex = lambda t: t.unsqueeze(0).expand(hk, *t.shape).contiguous()  # noqa: E731
    layer = Layer(keys, values, fine_c.to(dtype), ex(fine_sizes), ex(fine_offsets), coarse_c.to(dtype),
                  ex(coarse_sizes), ex(coarse_offsets), sink, window)
    from .clustering import cluster_spreads

    layer.fine_spread, layer.coarse_spread = cluster_spreads(
        keys, layer.fine_offsets, layer.fine_centroids, layer.fine_sizes, layer.coarse_centroids, layer.coarse_offsets)
    return layer


def estimate_kwargs(layer: Layer, qg: torch.Tensor, scale: float, estimate: str) -> dict:
    """The lookup's estimate terms as the engine passes them per step (``selection.select_positions``): the
    spreads, and the always-attended keys whose exact normaliser the coarse launch computes."""
    if estimate == "plain":
        return {}
    return dict(fine_spread=layer.fine_spread, coarse_spread=layer.coarse_spread,
                always_keys=(layer.keys, layer.sink, layer.window))


def make_queries(layer: Layer, hq: int, t: int, seed: int) -> torch.Tensor:
    """[1, Hq, T, D] queries that point at a few random fine clusters of their KV head (peaked attention)."""
    hk, cf, d = layer.fine_centroids.shape
    g = hq // hk
    gen = torch.Generator(device=layer.keys.device).manual_seed(seed)
    idx = torch.randint(0, cf, (hk, g * t, 3), generator=gen, device=layer.keys.device)
    cent = layer.fine_centroids.float()
    target = torch.stack([cent[h, idx[h]] for h in range(hk)]).sum(2) / math.sqrt(3)  # [Hk, G*T, D]
    q = 1.5 * target + 0.5 * torch.randn(target.shape, generator=gen, device=target.device)
    return q.reshape(1, hq, t, d).to(layer.keys.dtype)


# ----------------------------------------------------------------------------------------------- squeezed steps


def calibrate(layer: Layer, qg: torch.Tensor, keep: float, cfg: BenchConfig, scale: float, hierarchical: bool = True):
    """Per-head coarse and fine thresholds [Hk] that keep ``keep`` of the N tokens for these queries (flat
    lookup: the fine thresholds on the flat estimate; the coarse ones are unused then)."""
    from .kernels.lookup import centroid_probs
    from .kernels.reference import _budget_mask

    hk, n = layer.keys.shape[:2]
    fine_budget = torch.full((1, hk), max(keep * n - layer.sink - layer.window, 0.0), device=qg.device)
    coarse_budget = (fine_budget * cfg.coarse_slack).clamp(max=float(n))
    args = (qg, layer.fine_centroids, layer.fine_sizes, layer.coarse_centroids, layer.coarse_sizes,
            layer.coarse_offsets)
    kw = estimate_kwargs(layer, qg, scale, cfg.estimate)
    _, cprobs = centroid_probs(*args, None, None, fine_budget, coarse_budget, scale, True, **kw)
    ckeep = _budget_mask(cprobs, layer.coarse_sizes, torch.ones_like(cprobs, dtype=torch.bool), coarse_budget)
    cthr = torch.where(ckeep, cprobs, float("inf")).amin(-1)[0]  # [Hk]
    fprobs, _ = centroid_probs(*args, torch.zeros(hk, device=qg.device), cthr, None, None, scale, hierarchical, **kw)
    allowed = fprobs > 0
    fkeep = _budget_mask(fprobs, layer.fine_sizes, allowed, fine_budget)
    fthr = torch.where(fkeep, fprobs, float("inf")).amin(-1)[0]
    return fthr.contiguous(), cthr.contiguous()


def squeezed_fns(layer: Layer, q: torch.Tensor, fthr, cthr, scale: float, precision: str, estimate: str = "full",
                 budgets=None, hierarchical: bool = True):
    """(whole step, lookup only) closures for the squeezed attention of q [1, Hq, T, D]; ``budgets``
    (fine, coarse) [1, Hk] selects by budget instead of the thresholds; ``hierarchical=False``: a flat
    lookup over every fine centroid (as the engine does in budget mode when the coarse budget covers at least
    ``selection.FLAT_ABOVE`` of the clustered keys)."""
    from .kernels.lookup import centroid_lookup_positions
    from .kernels.positions import segment_lows
    from .kernels.sparse_attention import sparse_attention_positions

    b, hq, t, d = q.shape
    hk, n = layer.keys.shape[:2]
    qg = q.reshape(b, hk, (hq // hk) * t, d)
    lows = segment_lows(layer.fine_offsets, n, layer.window)
    sel = (fthr, cthr, None, None) if budgets is None else (None, None, *budgets)
    largs = (qg, layer.fine_centroids, layer.fine_sizes, layer.coarse_centroids, layer.coarse_sizes,
             layer.coarse_offsets, *sel, scale, hierarchical)

    def lookup():
        return centroid_lookup_positions(*largs, seg_lows=lows, num_tokens=n, sink_tokens=layer.sink,
                                         window_tokens=layer.window, precision=precision,
                                         **estimate_kwargs(layer, qg, scale, estimate))

    def step():
        _, _, pos, total = lookup()
        return sparse_attention_positions(q, layer.keys, layer.values, pos, total, scale)

    return step, lookup


def dense_candidates(q: torch.Tensor, layer: Layer):
    """name -> closure of every dense SDPA variant that runs here (fixed context only, no mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hq, hk = q.shape[1], layer.keys.shape[0]
    k, v = layer.keys.unsqueeze(0), layer.values.unsqueeze(0)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if q.device.type != "cuda":
        backends = {"math": SDPBackend.MATH}
    variants = [("gqa", k, v, hq != hk)]
    if hq != hk:
        g = hq // hk
        variants.append(("expanded", k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), False))
    out = {}
    for bname, backend in backends.items():
        for vname, kk, vv, gqa in variants:
            def fn(backend=backend, kk=kk, vv=vv, gqa=gqa):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa)
            try:
                fn()
            except Exception:  # backend not available for this shape / device
                continue
            out[f"{bname}-{vname}"] = fn
    return out


def best_dense(q, layer, timer: Timer, log) -> tuple[float, str]:
    times = {}
    for name, fn in dense_candidates(q, layer).items():
        try:
            times[name] = timer(fn)
        except Exception as exc:  # graph capture unsupported, out of memory, ...
            log(f"    dense {name}: failed ({type(exc).__name__})")
    gc.collect()
    best = min(times, key=times.get)
    log("    dense " + ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(times.items(), key=lambda kv: kv[1])))
    return times[best], best


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
            step, lookup = squeezed_fns(layer, q, fthr, cthr, scale, precision, cfg.estimate, budgets, hier)
            keep_mask, read, pos, total = lookup()
            kept = int(total.sum())
            kv_bytes = kept * kv_row
            spread_bytes = 4 if cfg.estimate == "full" else 0
            cent_bytes = int(read.sum()) * (d * layer.fine_centroids.element_size() + spread_bytes)
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
                       selection=a.selection, flat_decode=a.flat_decode)


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
    log(f"{'phase':22s} {'shape':10s} {'context':>8s} {'keep':>5s} {'dense':>8s} {'squeezed':>9s} {'speedup':>7s} {'GB/s':>6s}")
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
