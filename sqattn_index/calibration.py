"""Offline calibration of the selection thresholds from the observation window's queries.

Each window token is a sample query (its G query heads averaged per KV head). For a target keep fraction,
the coarse threshold is set so the coarse level keeps about ``coarse_slack`` times the target on average,
then the fine threshold (under that coarse filter, with the hierarchical denominator) so the average kept
fraction of clustered keys over the window queries equals the target.
"""

from __future__ import annotations

import torch

from .corpus_kv import LayerKV
from .kernels.reference import always_logz_ref, group_queries_ref
from .kernels.reference_lookup import _fine_parent, _per_key_probs, _spread_term
from .selection import cluster_token_target, estimate_args

__all__ = ["calibrate_layer", "threshold_for_fraction", "measured_keep_fraction"]


def threshold_for_fraction(probs: torch.Tensor, sizes: torch.Tensor, allowed: torch.Tensor, fraction: float
                           ) -> torch.Tensor:
    """Per-head threshold so that the mean over queries of the kept share of keys equals ``fraction``.

    probs [W, Hk, C] per-key probabilities of each sample query, sizes [Hk, C] keys per cluster,
    allowed [W, Hk, C] bool (clusters a query may keep at all). Returns [Hk] float32.
    """
    w, hk, c = probs.shape
    total = sizes.sum(-1).float() * w  # [Hk]
    p = torch.where(allowed, probs, torch.full_like(probs, -1.0)).permute(1, 0, 2).reshape(hk, w * c)
    n = sizes.unsqueeze(0).expand(w, hk, c).permute(1, 0, 2).reshape(hk, w * c).float()
    order = torch.argsort(p, dim=-1, descending=True)
    p_sorted = p.gather(-1, order)
    cum = n.gather(-1, order).cumsum(-1) / total.unsqueeze(-1)  # kept share if threshold = p_sorted[i]
    idx = torch.searchsorted(cum.contiguous(), torch.full((hk, 1), fraction, device=p.device)).clamp(max=w * c - 1)
    thr = p_sorted.gather(-1, idx).squeeze(-1)
    if fraction <= 0:  # keep nothing: above any probability, still finite
        thr = torch.full_like(thr, 2.0)
    return torch.where(thr < 0, torch.zeros_like(thr), thr).float()


def window_logz(grouped: torch.Tensor, keys: torch.Tensor, s_tok: int, w_tok: int, scale: float) -> torch.Tensor:
    """``always_logz_ref`` for the window's own queries, causally: window query w [W, Hk, G, D] sees the
    sinks and window keys 0..w of keys [Hk, N, D]. Returns [W, Hk, G] float32."""
    n = keys.shape[1]
    w = grouped.shape[0]
    if w != w_tok:  # stand-in queries (no window): not positions inside the window
        return always_logz_ref(grouped, keys, s_tok, w_tok, scale)
    qf = grouped.float()
    sink = scale * torch.einsum("whgd,hkd->whgk", qf, keys[:, :s_tok].float())
    win = scale * torch.einsum("whgd,hkd->whgk", qf, keys[:, n - w_tok:].float())
    seen = torch.arange(w_tok, device=qf.device).view(1, w_tok) <= torch.arange(w, device=qf.device).view(w, 1)
    win = torch.where(seen.view(w, 1, 1, w_tok), win, float("-inf"))
    return torch.logsumexp(torch.cat([sink, win], dim=-1), dim=-1)


def _coarse_probs(layer: LayerKV, grouped: torch.Tensor, scale: float, spread, fixed):
    qf = grouped.float()
    logits = (scale * torch.einsum("bhqd,hcd->bhqc", qf, layer.coarse_centroids.float())
              + _spread_term(qf, spread, scale))
    log_sizes = layer.coarse_sizes.float().log().view(1, layer.num_kv_heads, 1, -1)
    return logits, log_sizes, _per_key_probs(logits, log_sizes, fixed)


def _fine_probs(layer: LayerKV, logits: torch.Tensor, coarse_keep: torch.Tensor, c_logits, c_logsz, fixed):
    """Hierarchical per-key estimates of the fine clusters, given fine logits [W, Hk, G, Cf] (computed once)."""
    hk, cf = layer.num_kv_heads, layer.num_fine
    log_sizes = layer.fine_sizes.float().log().view(1, hk, 1, cf)
    parent = _fine_parent(layer.coarse_offsets, cf)
    allowed = coarse_keep.gather(-1, parent.unsqueeze(0).expand(coarse_keep.shape[0], hk, cf))
    extra = torch.logsumexp(torch.where(~coarse_keep.unsqueeze(2), c_logits + c_logsz, float("-inf")), dim=-1)
    if fixed is not None:
        extra = torch.logaddexp(extra, fixed)
    masked = torch.where(allowed.unsqueeze(2), logits, float("-inf"))
    return _per_key_probs(masked, log_sizes, extra), allowed


def _estimate_terms(layer: LayerKV, grouped: torch.Tensor, scale: float, variance_term: bool,
                    always_in_normaliser: bool):
    """(fine spread, coarse spread, fixed log-normaliser) as the query-time selection uses them
    (``selection.estimate_args``), with the window's queries normalised causally."""
    kw = estimate_args(layer, grouped, scale, variance_term, always_in_normaliser, window_logz)
    return kw.get("fine_spread"), kw.get("coarse_spread"), kw.get("fixed_logz")


def calibrate_layer(layer: LayerKV, window_queries: torch.Tensor, keep_ladder: tuple[float, ...], scale: float,
                    coarse_slack: float = 3.0, *, variance_term: bool = True, always_in_normaliser: bool = True,
                    hierarchical: bool = True) -> None:
    """Fill ``layer.thresholds`` and ``layer.coarse_thresholds`` [L, Hk] for every keep in ``keep_ladder``.

    window_queries: [Hq, W, D] post-RoPE queries of the observation window (W >= 1). ``variance_term``,
    ``always_in_normaliser`` and ``hierarchical`` must match the query-time estimate (``SqueezeConfig``):
    with ``hierarchical=False`` the fine thresholds are set on the flat estimate (every coarse cluster kept,
    so the coarse thresholds keep everything and are not used by a flat lookup).
    """
    hq, w, d = window_queries.shape
    hk = layer.num_kv_heads
    if w == 0:  # no window: use the last clustered keys as stand-in queries
        window_queries = layer.keys[:, -8:].repeat_interleave(hq // hk, dim=0)
        w = window_queries.shape[1]
    # One sample query per window token: [W, Hk, G, D].
    grouped = group_queries_ref(window_queries.permute(1, 0, 2).unsqueeze(2), hk)  # [W, Hk, G, D]
    f_spread, c_spread, fixed = _estimate_terms(layer, grouped, scale, variance_term, always_in_normaliser)
    c_logits, c_logsz, coarse_probs = _coarse_probs(layer, grouped, scale, c_spread, fixed)
    f_logits = (scale * torch.einsum("bhqd,hcd->bhqc", grouped.float(), layer.fine_centroids.float())
                + _spread_term(grouped.float(), f_spread, scale))
    s, e = layer.clustered_range
    fine_rows, coarse_rows = [], []
    for keep in keep_ladder:
        frac = cluster_token_target(layer, keep) / max(e - s, 1)
        c_frac = min(1.0, frac * coarse_slack) if hierarchical else 1.0
        everything = torch.ones_like(coarse_probs, dtype=torch.bool)
        c_thr = threshold_for_fraction(coarse_probs, layer.coarse_sizes, everything, c_frac)
        coarse_keep = coarse_probs >= c_thr.view(1, hk, 1)
        fine_probs, allowed = _fine_probs(layer, f_logits, coarse_keep, c_logits, c_logsz, fixed)
        fine_rows.append(threshold_for_fraction(fine_probs, layer.fine_sizes, allowed, frac))
        coarse_rows.append(c_thr)
    layer.keep_ladder = tuple(keep_ladder)
    layer.thresholds = torch.stack(fine_rows).to(layer.keys.device)
    layer.coarse_thresholds = torch.stack(coarse_rows).to(layer.keys.device)


def measured_keep_fraction(layer: LayerKV, window_queries: torch.Tensor, ladder_index: int, scale: float,
                           hierarchical: bool = True, *, variance_term: bool = True,
                           always_in_normaliser: bool = True) -> float:
    """Mean kept share of the *clustered* keys when each window query selects on its own (threshold mode)."""
    from .kernels.reference import centroid_lookup_ref

    hk = layer.num_kv_heads
    grouped = group_queries_ref(window_queries.permute(1, 0, 2).unsqueeze(2), hk)
    f_spread, c_spread, fixed = _estimate_terms(layer, grouped, scale, variance_term, always_in_normaliser)
    keep, _ = centroid_lookup_ref(grouped, layer.fine_centroids, layer.fine_sizes, layer.coarse_centroids,
                                  layer.coarse_sizes, layer.coarse_offsets, layer.thresholds[ladder_index],
                                  layer.coarse_thresholds[ladder_index], None, None, scale, hierarchical,
                                  fine_spread=f_spread, coarse_spread=c_spread, fixed_logz=fixed)
    kept = (keep.float() * layer.fine_sizes.unsqueeze(0).float()).sum(-1)  # [W, Hk]
    s, e = layer.clustered_range
    return float(kept.mean() / max(e - s, 1))
