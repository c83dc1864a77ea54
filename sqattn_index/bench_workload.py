"""The benchmark's workload: the synthetic clustered layer, its queries and calibrated thresholds, the
squeezed step closures, the dense SDPA candidates and the CUDA-graph timer (``sqattn_index.bench`` runs
the table over these; the GPU scripts in ``benchmarks/`` import them from there).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["SHAPES", "BenchConfig", "FLUSH_MODES", "Timer", "copy_bandwidth", "Layer", "synthetic_layer",
           "estimate_kwargs", "make_queries", "calibrate", "squeezed_fns", "dense_candidates", "best_dense"]

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
    fp8_centroids: bool = False  # decode rows: the lookup scores 8-bit centroid tables (kernels/centroid_fp8.py)
    clustering: bool = True
    sweep: bool = False  # time launch settings of the sparse kernel at the first context, keep 0.1
    profile: bool = False  # print a per-kernel profile of the squeezed step at the first context, keep 0.1
    append: bool = False  # merge into an existing results.json (same phase/shape/context/keep replaced)
    out: str = "docs/bench"
    device: str = "cuda"
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- timing


FLUSH_MODES = ("write", "read")


class Timer:
    """Median time in ms of a step: CUDA-graph replays between CUDA events, L2 flushed before each.

    ``flush``: "write" zeroes a 256 MB buffer (as ``triton.testing.do_bench``): the step then starts with the
    L2 full of dirty lines, and writing them back shares DRAM with the step's own reads. "read" sums the
    buffer instead: the L2 holds clean lines of other data, as after the weight reads that precede attention
    in a decode step. Both leave none of the step's own data in the L2."""

    def __init__(self, device: torch.device, reps: int, flush: str = "write"):
        if flush not in FLUSH_MODES:
            raise ValueError(f"flush must be one of {FLUSH_MODES}; got {flush!r}")
        self.device, self.reps, self.flush_mode = device, reps, flush
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if self.cuda else None
        self._sink = torch.empty((), dtype=torch.int64, device=device) if self.cuda else None

    def _flush(self) -> None:
        if self.flush_mode == "write":
            self.flush.zero_()
        else:
            torch.sum(self.flush.view(torch.int64), dim=0, out=self._sink)

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
            self._flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int = 2 * 2**30, graph: bool = False) -> float:
    """GB/s of a device-to-device clone of an ``nbytes`` buffer (default 2 GiB, timed without a CUDA graph),
    counting bytes read plus bytes written."""
    if device.type != "cuda":
        return 0.0
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    ms = timer(lambda: src.clone(), graph=graph)
    del src
    return 2 * nbytes / (ms * 1e-3) / 1e9


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

    def fp8_tables(self) -> dict:
        """The lookup's 8-bit centroid arguments (``kernels.centroid_fp8``), made once."""
        if getattr(self, "_fp8", None) is None:
            from .kernels.centroid_fp8 import lookup_tables

            self._fp8 = lookup_tables(self.fine_centroids, self.coarse_centroids)
        return self._fp8


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
    from .kernels.reference_lookup import _budget_mask

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
                 budgets=None, hierarchical: bool = True, fp8: bool = False):
    """(whole step, lookup only) closures for the squeezed attention of q [1, Hq, T, D]; ``budgets``
    (fine, coarse) [1, Hk] selects by budget instead of the thresholds; ``hierarchical=False``: a flat
    lookup over every fine centroid (as the engine does in budget mode when the coarse budget covers at least
    ``selection.FLAT_ABOVE`` of the clustered keys); ``fp8``: the lookup scores 8-bit centroid tables
    (``Layer.fp8_tables``)."""
    from .kernels.lookup import centroid_lookup_positions
    from .kernels.positions import segment_lows
    from .kernels.sparse_attention import sparse_attention_positions

    b, hq, t, d = q.shape
    hk, n = layer.keys.shape[:2]
    qg = q.reshape(b, hk, (hq // hk) * t, d)
    lows = segment_lows(layer.fine_offsets, n, layer.window)
    sel = (fthr, cthr, None, None) if budgets is None else (None, None, *budgets)
    tables = layer.fp8_tables() if fp8 else dict(fine_centroids=layer.fine_centroids,
                                                  coarse_centroids=layer.coarse_centroids)
    largs = (qg, tables["fine_centroids"], layer.fine_sizes, tables["coarse_centroids"], layer.coarse_sizes,
             layer.coarse_offsets, *sel, scale, hierarchical)
    scales = {k: v for k, v in tables.items() if k.endswith("_scales")}

    def lookup():
        return centroid_lookup_positions(*largs, seg_lows=lows, num_tokens=n, sink_tokens=layer.sink,
                                         window_tokens=layer.window, precision=precision,
                                         **estimate_kwargs(layer, qg, scale, estimate), **scales)

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
