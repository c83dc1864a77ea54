"""Query-time selection: which fixed-context key ranges each KV head attends, and what that costs.

``keep`` is the fraction of the fixed context's tokens attended (sinks and observation window included).
keep == 1.0 attends everything (dense, no lookup). A keep on the calibrated ladder uses the calibrated
thresholds; any other keep (or ``selection="budget"``) keeps the top clusters up to that many tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SqueezeConfig, check_keep
from .corpus_kv import LayerKV
from .kernels.dispatch import FEW_QUERIES
from .kernels.reference import always_logz_ref, group_queries_ref

__all__ = ["SelectionSpec", "Selection", "select_ranges"]


@dataclass(frozen=True)
class SelectionSpec:
    """How to select for one answer: keep fraction, mode and lookup shape."""

    keep: float
    mode: str = "threshold"  # "threshold" | "budget" (dense when keep == 1.0)
    hierarchical: bool = True
    coarse_slack: float = 10.0
    variance_term: bool = True
    always_in_normaliser: bool = True
    budget_slack: float = 0.0  # Triton budget search only (the torch path is exact, which is within the bound)
    centroid_precision: str = "model"  # "fp8": lookups of few queries (decode) score 8-bit centroid tables

    @classmethod
    def from_config(cls, keep: float, config: SqueezeConfig) -> "SelectionSpec":
        return cls(keep=check_keep(keep), mode=config.selection, hierarchical=config.hierarchical,
                   coarse_slack=config.coarse_slack, variance_term=config.variance_term,
                   always_in_normaliser=config.always_in_normaliser, budget_slack=config.budget_slack,
                   centroid_precision=config.centroid_precision)

    def fp8_for(self, queries_per_head: int) -> bool:
        """Whether a lookup of this many grouped queries per KV head scores the 8-bit tables: decode-sized
        lookups only (the many-query kernels score 16-bit tables on tensor cores)."""
        return self.centroid_precision == "fp8" and queries_per_head <= FEW_QUERIES

    @property
    def dense(self) -> bool:
        return self.keep >= 1.0


@dataclass
class Selection:
    """Kept ranges of one layer for one step: starts/ends [B, Hk, R], counts [B, Hk], plus cost."""

    starts: torch.Tensor
    ends: torch.Tensor
    counts: torch.Tensor
    tokens_read: torch.Tensor | int  # kept fixed-context tokens, summed over batch and KV heads (0-dim, on device)
    centroids_read: torch.Tensor | int  # centroids scored, summed over batch and KV heads


def _ladder_index(layer: LayerKV, keep: float) -> int | None:
    for i, k in enumerate(layer.keep_ladder):
        if abs(k - keep) < 1e-6:
            return i
    return None


def cluster_token_target(layer: LayerKV, keep: float) -> float:
    """Clustered tokens to keep so that the total kept (always-attended included) is keep * N."""
    s, e = layer.clustered_range
    fixed = layer.num_tokens - (e - s)
    return float(min(max(keep * layer.num_tokens - fixed, 0.0), e - s))


FLAT_ABOVE = 0.9  # budget mode: coarse budget / clustered keys from which the lookup skips the coarse level


def _selection_args(layer: LayerKV, spec: SelectionSpec, b: int):
    """(fine_threshold, coarse_threshold, budget, coarse_budget, hierarchical) for ``spec``: calibrated
    thresholds when the keep is on the layer's ladder (threshold mode), else key budgets per (question, KV
    head). A coarse budget that covers every clustered key keeps every coarse cluster, which is exactly the
    flat lookup (same normaliser, same fine decisions) without the coarse pass; from ``FLAT_ABOVE`` of the
    clustered keys on, the lookup runs flat too: the coarse level would spare at most a tenth of the fine
    scoring and costs a pass of its own plus a fine level walked parent by parent (docs/bench/README.md)."""
    dev = layer.keys.device
    idx = _ladder_index(layer, spec.keep) if spec.mode == "threshold" else None
    if idx is not None and layer.thresholds is not None:
        return layer.thresholds[idx].to(dev), layer.coarse_thresholds[idx].to(dev), None, None, spec.hierarchical
    s, e = layer.clustered_range
    target = cluster_token_target(layer, spec.keep)
    hierarchical = spec.hierarchical and target * spec.coarse_slack < FLAT_ABOVE * (e - s)
    memo = layer.__dict__.setdefault("_budget_args", {})  # fixed per (layer, spec, B): no launches per step
    key = (spec, b, dev)
    if key in memo:
        return (None, None) + memo[key] + (hierarchical,)
    budget = torch.full((b, layer.num_kv_heads), target, dtype=torch.float32, device=dev)
    args = (budget, torch.clamp(budget * spec.coarse_slack, max=float(e - s)))
    if not (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()):  # graph-pool memory must not stay
        memo[key] = args
    return (None, None) + args + (hierarchical,)


def centroid_bytes(layer: LayerKV, spec: SelectionSpec, queries_per_head: int = 1) -> int:
    """Bytes read per centroid scored: the centroid (one byte per dimension from an 8-bit table), plus its
    fp32 spread when the variance term is on."""
    spread = 4 if spec.variance_term and layer.fine_spread is not None else 0
    size = 1 if spec.fp8_for(queries_per_head) else layer.fine_centroids.element_size()
    return layer.head_dim * size + spread


def centroid_tables(layer: LayerKV, spec: SelectionSpec, queries_per_head: int) -> dict:
    """The lookup's centroid keyword arguments: the layer's tables, or its 8-bit ones with their scales."""
    if spec.fp8_for(queries_per_head):
        return layer.fp8_tables()
    return dict(fine_centroids=layer.fine_centroids, coarse_centroids=layer.coarse_centroids)


def estimate_args(layer: LayerKV, grouped: torch.Tensor, scale: float, variance_term: bool,
                  always_in_normaliser: bool, logz_fn=always_logz_ref) -> dict:
    """The lookup's optional estimate terms (keyword arguments of ``centroid_lookup``): the cluster spreads
    (when the layer has them) and the always-attended keys' exact log-normaliser of the grouped queries
    [B, Hk, Q, D]. ``logz_fn(grouped, keys, sink_tokens, window_tokens, scale)``: ``always_logz_ref``, the
    Triton ``always_logz``, or calibration's causal version for the window's own queries."""
    out = {}
    if variance_term and layer.fine_spread is not None:
        out["fine_spread"], out["coarse_spread"] = layer.fine_spread, layer.coarse_spread
    if always_in_normaliser:
        out["fixed_logz"] = logz_fn(grouped, layer.keys, layer.sink_tokens, layer.window_tokens, scale)
    return out


def select_positions(layer: LayerKV, q: torch.Tensor, spec: SelectionSpec, scale: float, counter=None):
    """The Triton fast path: kept-key positions with no host sync (CUDA-graph capturable).

    ``counter``: optional ``(acc, token_bytes, centroid_bytes, dense_bytes)`` (``kept_positions``): the
    positions kernel adds the bytes this selection reads, and the dense bytes, to ``acc`` (int64 [2]).
    Returns pos [B, Hk, N] int32 (sorted positions, first ``total`` valid) and total [B, Hk] int32; with
    ``spec.dense`` every position (nothing is counted then)."""
    from .kernels.lookup import centroid_lookup_positions
    from .kernels.positions import segment_lows

    b, hk, n = q.shape[0], layer.num_kv_heads, layer.num_tokens
    if spec.dense:
        pos = torch.arange(n, dtype=torch.int32, device=layer.keys.device).expand(b, hk, n)
        total = torch.full((b, hk), n, dtype=torch.int32, device=layer.keys.device)
        return pos, total
    lows = getattr(layer, "_seg_lows", None)
    if lows is None:
        lows = segment_lows(layer.fine_offsets, n, layer.window_tokens)
        layer._seg_lows = lows
    fine_thr, coarse_thr, budget, coarse_budget, hierarchical = _selection_args(layer, spec, b)
    grouped = group_queries_ref(q, hk)
    terms = estimate_args(layer, grouped, scale, spec.variance_term, False)
    if spec.always_in_normaliser:  # computed inside the lookup's first launch
        terms["always_keys"] = (layer.keys, layer.sink_tokens, layer.window_tokens)
    _, _, pos, total = centroid_lookup_positions(
        grouped, fine_sizes=layer.fine_sizes, coarse_sizes=layer.coarse_sizes, coarse_offsets=layer.coarse_offsets,
        fine_threshold=fine_thr, coarse_threshold=coarse_thr, budget=budget, coarse_budget=coarse_budget,
        scale=scale, hierarchical=hierarchical, seg_lows=lows, num_tokens=n, sink_tokens=layer.sink_tokens,
        window_tokens=layer.window_tokens, counter=counter, budget_slack=spec.budget_slack, **terms,
        **centroid_tables(layer, spec, grouped.shape[2]))
    return pos, total


def select_ranges(layer: LayerKV, q: torch.Tensor, spec: SelectionSpec, ops, scale: float) -> Selection:
    """Select the ranges of ``layer`` that queries ``q`` [B, Hq, T, D] attend under ``spec``."""
    b = q.shape[0]
    hk, n = layer.num_kv_heads, layer.num_tokens
    dev = layer.keys.device
    if spec.dense:
        starts = torch.zeros(b, hk, 1, dtype=torch.int64, device=dev)
        ends = torch.full((b, hk, 1), n, dtype=torch.int64, device=dev)
        counts = torch.ones(b, hk, dtype=torch.int64, device=dev)
        return Selection(starts, ends, counts, tokens_read=b * hk * n, centroids_read=0)
    grouped = group_queries_ref(q, hk)  # [B, Hk, G*T, D]
    fine_thr, coarse_thr, budget, coarse_budget, hierarchical = _selection_args(layer, spec, b)
    keep_mask, read = ops.centroid_lookup(
        grouped, fine_sizes=layer.fine_sizes, coarse_sizes=layer.coarse_sizes, coarse_offsets=layer.coarse_offsets,
        fine_threshold=fine_thr, coarse_threshold=coarse_thr, budget=budget, coarse_budget=coarse_budget,
        scale=scale, hierarchical=hierarchical,
        **estimate_args(layer, grouped, scale, spec.variance_term, spec.always_in_normaliser,
                        getattr(ops, "always_logz", always_logz_ref)), **centroid_tables(layer, spec, grouped.shape[2]))
    starts, ends, counts = ops.ranges_from_mask(keep_mask, layer.fine_offsets, n, layer.sink_tokens,
                                                layer.window_tokens)
    # Kept as device tensors: no host sync per layer and step (the budget is read once, at the end).
    tokens = (ends - starts).clamp(min=0).sum()
    return Selection(starts, ends, counts, tokens_read=tokens, centroids_read=read.sum())
