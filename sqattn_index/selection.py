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
from .kernels.reference import group_queries_ref

__all__ = ["SelectionSpec", "Selection", "select_ranges"]


@dataclass(frozen=True)
class SelectionSpec:
    """How to select for one answer: keep fraction, mode and lookup shape."""

    keep: float
    mode: str = "threshold"  # "threshold" | "budget" (dense when keep == 1.0)
    hierarchical: bool = True
    coarse_slack: float = 5.0

    @classmethod
    def from_config(cls, keep: float, config: SqueezeConfig) -> "SelectionSpec":
        return cls(keep=check_keep(keep), mode=config.selection, hierarchical=config.hierarchical,
                   coarse_slack=config.coarse_slack)

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
    idx = _ladder_index(layer, spec.keep) if spec.mode == "threshold" else None
    fine_thr = coarse_thr = budget = coarse_budget = None
    if idx is not None and layer.thresholds is not None:
        fine_thr = layer.thresholds[idx].to(dev)
        coarse_thr = layer.coarse_thresholds[idx].to(dev)
    else:
        target = cluster_token_target(layer, spec.keep)
        s, e = layer.clustered_range
        budget = torch.full((b, hk), target, dtype=torch.float32, device=dev)
        coarse_budget = torch.clamp(budget * spec.coarse_slack, max=float(e - s))
    keep_mask, read = ops.centroid_lookup(
        grouped, layer.fine_centroids, layer.fine_sizes, layer.coarse_centroids, layer.coarse_sizes,
        layer.coarse_offsets, fine_thr, coarse_thr, budget, coarse_budget, scale, spec.hierarchical)
    starts, ends, counts = ops.ranges_from_mask(keep_mask, layer.fine_offsets, n, layer.sink_tokens,
                                                layer.window_tokens)
    # Kept as device tensors: no host sync per layer and step (the budget is read once, at the end).
    tokens = (ends - starts).clamp(min=0).sum()
    return Selection(starts, ends, counts, tokens_read=tokens, centroids_read=read.sum())
