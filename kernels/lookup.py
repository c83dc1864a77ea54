"""Hierarchical centroid lookup in Triton (same contract as ``centroid_lookup_ref``).

Two kernels (in ``lookup_kernels.py``; their per-level launches and settings in ``lookup_level.py``), each run
per level over a grid ``(cluster groups, query chunks, B * Hk)``. A program owns a
contiguous range of clusters: a block of ``BLOCK_C`` clusters (coarse level, flat lookup), or at the fine
level of a hierarchical lookup the fine clusters of one coarse cluster, so a dropped coarse cluster costs its
program nothing but writing zeros and the fine level does work only under kept coarse clusters.

``_lse_kernel``   partial log-normalisers ``logsumexp_c(s * q.c + log n_c)`` of the program's selected clusters
                  for each query (with few queries it keeps the logits in a scratch buffer too).
``_prob_kernel``  reduces the partials to ``log Z_q`` and sums ``exp(s * q.c - log Z_q)`` over the queries: the
                  per-key probability estimate of each cluster. With one query chunk it decides ``keep``
                  against the threshold in-kernel, writes the dropped coarse clusters' partial log-normalisers
                  (the coarse terms of the hierarchical denominator) and the kept segment lengths.

Scores: few queries (decode, Q <= 16) row by row in fp32 on CUDA cores; many queries with ``tl.dot``: the
native 16-bit dot when queries and centroids share a 16-bit dtype (products of 16-bit numbers are exact in
fp32, so this matches the reference's fp32 math up to summation order; an 8-bit table, ``centroid_fp8``,
scores the same way with its power-of-two scales folded into the queries), else fp32 with ``precision``
"ieee" (default) or "tf32" (faster). Budget mode picks the top clusters from the Triton-computed
probabilities with ``budget.budget_mask`` (a bisection, no sort).
"""

from __future__ import annotations


import torch
import triton

from .budget import budget_mask, budget_mask_from_logits
from .centroid_fp8 import dequantize_centroids, is_fp8
from .decide import decide_from_logits
from .lookup_level import FEW_QUERIES, TUNING, TUNING_FP8, _Level  # noqa: F401  (re-exported: sweeps edit them)
from .compaction import write_seglen
from .lookup_many import many_query_lookup
from .positions import kept_positions, segment_block, segment_lows

__all__ = ["centroid_lookup", "centroid_lookup_positions", "centroid_probs"]


def _check_args(fine_threshold, budget, coarse_threshold, coarse_budget, hierarchical, precision):
    if (fine_threshold is None) == (budget is None):
        raise ValueError("give exactly one of fine_threshold and budget")
    if hierarchical and fine_threshold is not None and coarse_threshold is None:
        raise ValueError("threshold mode with hierarchical=True needs coarse_threshold")
    if hierarchical and budget is not None and coarse_budget is None:
        raise ValueError("budget mode with hierarchical=True needs coarse_budget")
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32'; got {precision!r}")


def _run(q, fine_centroids, fine_sizes, coarse_centroids, coarse_sizes, coarse_offsets, fine_threshold,
         coarse_threshold, budget, coarse_budget, scale, hierarchical, precision, seglen=None, sink=0, window=0,
         fine_spread=None, coarse_spread=None, fixed_logz=None, always_keys=None, excl=None, budget_slack=0.0,
         blocksum=None, fine_centroid_scales=None, coarse_centroid_scales=None):
    """The whole lookup. Returns keep [B, Hk, Cf] bool, the allowed mask [B, Hk, Cf] uint8 (None when flat),
    the fine and the coarse probabilities. With ``seglen`` [B, Hk, Cf + 2] int32 it also writes the kept
    length of every segment (sinks, fine clusters, window) there, and in budget mode with ``excl`` (same
    shape) their exclusive prefix sums; a flat threshold lookup of few queries (``_decides_from_logits``)
    writes the kept keys per block of segments into ``blocksum`` (``decide.decide_from_logits``).
    ``always_keys`` = (keys, sink, window) stands for ``fixed_logz = always_logz(q, keys, sink, window,
    scale)``, computed inside the first level's normaliser launch (coarse, or fine when flat) by extra
    programs. 8-bit (float8 e4m3) centroid tables come with their ``*_centroid_scales`` [Hk, D]
    (``centroid_fp8``)."""
    _check_args(fine_threshold, budget, coarse_threshold, coarse_budget, hierarchical, precision)
    if always_keys is not None and fixed_logz is not None:
        raise ValueError("give at most one of fixed_logz and always_keys")
    _check_fp8(fine_centroids, fine_centroid_scales, "fine")
    if hierarchical:
        _check_fp8(coarse_centroids, coarse_centroid_scales, "coarse")
    many = q.shape[2] > FEW_QUERIES and TUNING["many_path"] == "stationary"  # lookup_many.py's kernels
    if many:
        # the many-query kernels score 16-bit or fp32 tables: an 8-bit one is widened first, exactly (an e4m3
        # value times a power of two is a bf16 number; pass the 16-bit table for prefill to skip this)
        wide = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
        if is_fp8(fine_centroids):
            fine_centroids = dequantize_centroids(fine_centroids, fine_centroid_scales).to(wide)
        if hierarchical and is_fp8(coarse_centroids):
            coarse_centroids = dequantize_centroids(coarse_centroids, coarse_centroid_scales).to(wide)
    first = coarse_centroids if hierarchical else fine_centroids
    scored_as = q.dtype if is_fp8(first) else first.dtype  # an 8-bit table is scored in the queries' dtype
    if always_keys is not None and always_keys[0].dtype != scored_as:
        from .always_logz import always_logz  # the launch scores keys as centroids: same dtype needed

        fixed_logz, always_keys = always_logz(q, *always_keys, scale), None
    q = q if q.stride(-1) == 1 else q.contiguous()
    b, hk, nq, _ = q.shape
    if many:
        return many_query_lookup(q, fine_centroids, fine_sizes, coarse_centroids, coarse_sizes, coarse_offsets,
                                 fine_threshold, coarse_threshold, budget, coarse_budget, scale, hierarchical,
                                 precision, seglen=seglen, sink=sink, window=window, fine_spread=fine_spread,
                                 coarse_spread=coarse_spread, fixed_logz=fixed_logz, always_keys=always_keys,
                                 excl=excl, budget_slack=budget_slack)
    thr = fine_threshold.float().contiguous() if fine_threshold is not None else None
    coarse_probs = allowed = None
    seg = dict(seglen=seglen, sink=sink, window=window, fixed=fixed_logz)
    if not hierarchical:
        fine = _Level(q, fine_centroids, fine_sizes, scale, precision, spread=fine_spread, flat_fine=True,
                      cscale=fine_centroid_scales)
        part, _, logits = fine.lse(always=always_keys)  # with always_keys: the extra row is in the normaliser
        if thr is None and logits is not None:  # budget, few queries: the probabilities in the budget launch
            keep, probs = budget_mask_from_logits(logits, part, fixed_logz, fine_sizes, budget, seglen=seglen,
                                                  sink=sink, window=window, excl=excl, slack=budget_slack)
            return keep, None, probs, None
        if logits is not None:  # threshold, few queries (_decides_from_logits): decisions from the logits
            probs, keep = decide_from_logits(logits, part, thr, fine_sizes, fixed_logz=fixed_logz, seglen=seglen,
                                             blocksum=blocksum, sink=sink, window=window)
            return keep, None, probs, None
        probs, keep, _ = fine.probs([part], thr=thr, logits=logits, **seg)
    else:
        coarse = _Level(q, coarse_centroids, coarse_sizes, scale, precision, spread=coarse_spread,
                        cscale=coarse_centroid_scales)
        fine = _Level(q, fine_centroids, fine_sizes, scale, precision, coff=coarse_offsets, spread=fine_spread,
                      cscale=fine_centroid_scales)
        part_c, _, logits_c = coarse.lse(always=always_keys)
        cfixed = fixed_logz
        if always_keys is not None:  # the last partial row: in the coarse normaliser already, and the fine one's
            seg["fixed"], cfixed = part_c[:, :, -1], None
        if thr is not None:
            cthr = coarse_threshold.float().contiguous()
            coarse_probs, keep_c, dpart = coarse.probs([part_c], thr=cthr, write_dropped=True, fixed=cfixed)
        else:
            coarse_probs, _, _ = coarse.probs([part_c], logits=logits_c, fixed=cfixed)
            keep_c = budget_mask(coarse_probs, coarse_sizes, None, coarse_budget).view(torch.uint8)
            dpart = None
        if dpart is None:  # the dropped coarse clusters' terms of the denominator, in a separate pass
            dpart, _, _ = coarse.lse(keepc=keep_c, dropped=True)
        part_f, allowed, logits = fine.lse(keepc=keep_c)
        probs, keep, _ = fine.probs([part_f, dpart], keepc=keep_c, allowed=allowed, thr=thr, logits=logits, **seg)
    if thr is None:
        keep = budget_mask(probs, fine_sizes, allowed, budget, seglen=seglen, sink=sink, window=window, excl=excl,
                           slack=budget_slack)
    else:
        keep = keep.view(torch.bool)
    if seglen is not None and thr is not None and fine.nqc > 1:
        write_seglen(seglen, keep, fine_sizes, sink, window)
    return keep, allowed, probs, coarse_probs


def _check_fp8(centroids, scales, level):
    if is_fp8(centroids) and (scales is None or scales.shape != (centroids.shape[0], centroids.shape[2])):
        raise ValueError(f"8-bit {level} centroids {tuple(centroids.shape)} need {level}_centroid_scales "
                         f"[Hk, D] = {(centroids.shape[0], centroids.shape[2])} (centroid_fp8.quantize_centroids); "
                         f"got {None if scales is None else tuple(scales.shape)}")
    if scales is not None and not is_fp8(centroids):
        raise ValueError(f"{level}_centroid_scales go with float8 e4m3 {level} centroids; got {centroids.dtype}")


def _decides_from_logits(q, fine_threshold, hierarchical) -> bool:
    """Whether ``_run`` takes its threshold decisions with ``decide_from_logits`` (flat, few queries)."""
    return fine_threshold is not None and not hierarchical and q.shape[2] <= FEW_QUERIES


def _read(allowed, b, hk, cf, cc, device):
    if allowed is None:
        return torch.full((b, hk), cf, dtype=torch.int64, device=device)
    return allowed.sum(-1) + cc


LOOKUP_DOC_ARGS = """
    Args:
        q: [B, Hk, Q, D] grouped queries (``group_queries_ref``), any float dtype.
        fine_centroids: [Hk, Cf, D] any float dtype; fine_sizes: [Hk, Cf] int64 (keys per cluster, >= 1).
        coarse_centroids: [Hk, Cc, D]; coarse_sizes: [Hk, Cc] int64; coarse_offsets: [Hk, Cc + 1] int64.
        fine_threshold / coarse_threshold: [Hk] float32 per-key probability thresholds (threshold mode), or None.
        budget / coarse_budget: [B, Hk] float32 keys to keep per level (budget mode), or None.
        scale: softmax scale; hierarchical: False for a flat lookup over every fine centroid.
        fine_spread / coarse_spread: [Hk, Cf] / [Hk, Cc] per-dimension key variance per cluster (the variance
            term of the estimate), or None; fixed_logz: [B, Hk, Q] exact log-normaliser of the always-attended
            keys (``always_logz_ref``), or None.
        precision: fp32 scores of many queries (Q > 16) against fp32 centroids: "ieee" (exact, default) or
            "tf32" (faster; decisions may differ from the reference within about 1e-3 of a threshold).
        fine_centroid_scales / coarse_centroid_scales: [Hk, D] float32 scales of float8 e4m3 centroid tables
            (``centroid_fp8.quantize_centroids``; the lookup scores the dequantised table), or None.
"""


def centroid_lookup(
    q: torch.Tensor,
    fine_centroids: torch.Tensor,
    fine_sizes: torch.Tensor,
    coarse_centroids: torch.Tensor,
    coarse_sizes: torch.Tensor,
    coarse_offsets: torch.Tensor,
    fine_threshold: torch.Tensor | None,
    coarse_threshold: torch.Tensor | None,
    budget: torch.Tensor | None,
    coarse_budget: torch.Tensor | None,
    scale: float,
    hierarchical: bool = True,
    *,
    fine_spread: torch.Tensor | None = None,
    coarse_spread: torch.Tensor | None = None,
    fixed_logz: torch.Tensor | None = None,
    precision: str = "ieee",
    fine_centroid_scales: torch.Tensor | None = None,
    coarse_centroid_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which fine clusters to keep, by coarse-then-fine centroid lookup (Triton; same arguments and results
    as ``centroid_lookup_ref``).

    Returns:
        keep [B, Hk, Cf] bool, centroids_read [B, Hk] int64.
    """
    keep, allowed, _, _ = _run(q, fine_centroids, fine_sizes, coarse_centroids, coarse_sizes, coarse_offsets,
                               fine_threshold, coarse_threshold, budget, coarse_budget, scale, hierarchical,
                               precision, fine_spread=fine_spread, coarse_spread=coarse_spread,
                               fixed_logz=fixed_logz, fine_centroid_scales=fine_centroid_scales,
                               coarse_centroid_scales=coarse_centroid_scales)
    return keep, _read(allowed, *keep.shape, coarse_centroids.shape[1], q.device)


centroid_lookup.__doc__ += LOOKUP_DOC_ARGS


def centroid_probs(*args, precision: str = "ieee", **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same arguments as ``centroid_lookup``; returns the fine per-key probabilities [B, Hk, Cf] (0 outside
    kept coarse clusters) and the coarse ones [B, Hk, Cc] (None when flat). For tests and calibration."""
    names = ("q", "fine_centroids", "fine_sizes", "coarse_centroids", "coarse_sizes", "coarse_offsets",
             "fine_threshold", "coarse_threshold", "budget", "coarse_budget", "scale", "hierarchical")
    bound = dict(zip(names, args), **kwargs)
    bound.setdefault("hierarchical", True)
    _, _, probs, coarse_probs = _run(**bound, precision=precision)
    return probs, coarse_probs


def centroid_lookup_positions(
    q: torch.Tensor,
    fine_centroids: torch.Tensor,
    fine_sizes: torch.Tensor,
    coarse_centroids: torch.Tensor,
    coarse_sizes: torch.Tensor,
    coarse_offsets: torch.Tensor,
    fine_threshold: torch.Tensor | None,
    coarse_threshold: torch.Tensor | None,
    budget: torch.Tensor | None,
    coarse_budget: torch.Tensor | None,
    scale: float,
    hierarchical: bool = True,
    *,
    fine_offsets: torch.Tensor | None = None,
    seg_lows: torch.Tensor | None = None,
    num_tokens: int,
    sink_tokens: int,
    window_tokens: int,
    fine_spread: torch.Tensor | None = None,
    coarse_spread: torch.Tensor | None = None,
    fixed_logz: torch.Tensor | None = None,
    precision: str = "ieee",
    counter: tuple | None = None,
    always_keys: tuple | None = None,
    budget_slack: float = 0.0,
    fine_centroid_scales: torch.Tensor | None = None,
    coarse_centroid_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``centroid_lookup`` plus the sorted position of every kept key (sinks, kept clusters, window) for
    ``sparse_attention.sparse_attention_positions``: no host sync, CUDA-graph capturable.

    Extra args: fine_offsets [Hk, Cf + 1] int64, or seg_lows [Hk, Cf + 2] int32 from
    ``positions.segment_lows`` (compute it once per layer); num_tokens N; sink_tokens; window_tokens;
    counter: ``(acc, token_bytes, centroid_bytes, dense_bytes)`` to add the bytes read and the dense bytes
    to an int64 [2] accumulator on the device (``positions.kept_positions``); always_keys:
    ``(keys [Hk, N, D], sink_tokens, window_tokens)`` instead of ``fixed_logz``: the same exact
    log-normaliser of the always-attended keys, computed by extra programs of the coarse level's first
    launch (one launch less than ``always_logz`` + lookup); budget_slack: the fine budget search may stop once
    it keeps at most (1 + budget_slack) x budget keys (``budget.budget_mask``'s ``slack``; 0: exact).
    Returns:
        keep [B, Hk, Cf] bool, centroids_read [B, Hk] int64, pos [B, Hk, N] int32, total [B, Hk] int32.
    """
    if seg_lows is None:
        if fine_offsets is None:
            raise ValueError("give fine_offsets or seg_lows")
        seg_lows = segment_lows(fine_offsets, num_tokens, window_tokens)
    b, hk = q.shape[:2]
    seglen = torch.empty(b, hk, fine_centroids.shape[1] + 2, dtype=torch.int32, device=q.device)
    excl = torch.empty_like(seglen) if budget is not None else None  # budget mode: prefix sums in the search
    blocksum = None  # flat threshold decode: kept keys per block of segments, from the decisions launch
    if _decides_from_logits(q, fine_threshold, hierarchical):
        blocksum = torch.empty(b, hk, triton.cdiv(seglen.shape[2], segment_block()), dtype=torch.int32,
                               device=q.device)
    keep, allowed, _, _ = _run(q, fine_centroids, fine_sizes, coarse_centroids, coarse_sizes, coarse_offsets,
                               fine_threshold, coarse_threshold, budget, coarse_budget, scale, hierarchical,
                               precision, seglen=seglen, sink=sink_tokens, window=window_tokens,
                               fine_spread=fine_spread, coarse_spread=coarse_spread, fixed_logz=fixed_logz,
                               always_keys=always_keys, excl=excl, budget_slack=budget_slack, blocksum=blocksum,
                               fine_centroid_scales=fine_centroid_scales,
                               coarse_centroid_scales=coarse_centroid_scales)
    scored = coarse_centroids.shape[1] if allowed is not None else fine_centroids.shape[1]  # besides allowed
    pos, total, read = kept_positions(seglen, seg_lows, num_tokens, allowed=allowed, num_coarse=scored,
                                      counter=counter, excl=excl, blocksum=blocksum)
    return keep, read, pos, total


centroid_lookup_positions.__doc__ += LOOKUP_DOC_ARGS

