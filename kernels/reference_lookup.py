"""Torch references of the centroid lookup (``lookup.py``, ``lookup_many.py``, ``decide.py``, ``budget.py``,
``compaction.py``): per-key probability estimates from centroids, threshold and budget decisions, the
hierarchical coarse-then-fine lookup. ``reference.py`` re-exports the public names (and the private helpers
that calibration and the benchmark share); shapes as there.
"""

from __future__ import annotations

import torch

from .centroid_fp8 import dequantize_centroids

__all__ = ["budget_mask_ref", "centroid_lookup_ref", "compact_fine_ref", "decide_from_logits_ref"]

NEG_INF = float("-inf")


def _spread_term(qf: torch.Tensor, spread: torch.Tensor | None, scale: float) -> torch.Tensor | float:
    """s^2 |q|^2 v_c / 2 [B, Hk, Q, C] (0 without spreads): log of E exp(s q.k) / exp(s q.c) for keys spread
    evenly around c with per-dimension variance v_c."""
    if spread is None:
        return 0.0
    qn2 = (qf * qf).sum(-1, keepdim=True)  # [B, Hk, Q, 1]
    return 0.5 * scale * scale * qn2 * spread.float().unsqueeze(0).unsqueeze(2)


def _per_key_probs(logits: torch.Tensor, log_sizes: torch.Tensor, extra_logz: torch.Tensor | None = None):
    """Mean over queries of exp(logit - logZ), Z = sum_c n_c exp(logit_c) (+ exp(extra_logz)), computed stably.

    logits [B, Hk, Q, C] (masked entries -inf), log_sizes [B or 1, Hk, 1, C], extra_logz [B, Hk, Q] or None.
    Returns [B, Hk, C] float32.
    """
    logz = torch.logsumexp(logits + log_sizes, dim=-1)  # [B, Hk, Q]
    if extra_logz is not None:
        logz = torch.logaddexp(logz, extra_logz)
    return torch.exp(logits - logz.unsqueeze(-1)).mean(dim=2)


def _budget_mask(probs: torch.Tensor, sizes: torch.Tensor, allowed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Keep clusters in descending per-key probability while the kept key count is below ``target``.

    probs [B, Hk, C], sizes [Hk, C], allowed [B, Hk, C] bool, target [B, Hk] keys. Overshoots by < one cluster.
    """
    score = torch.where(allowed, probs, torch.full_like(probs, -1.0))
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    sz = sizes.unsqueeze(0).expand_as(probs).gather(-1, order).to(torch.float64)
    before = torch.cumsum(sz, dim=-1) - sz  # keys already kept before this cluster
    take = (before < target.unsqueeze(-1)) & allowed.gather(-1, order)
    mask = torch.zeros_like(allowed)
    mask.scatter_(-1, order, take)
    return mask


budget_mask_ref = _budget_mask  # the reference of kernels/budget.py


def decide_from_logits_ref(
    logits: torch.Tensor,
    parts: torch.Tensor,
    threshold: torch.Tensor,
    sizes: torch.Tensor,
    *,
    fixed_logz: torch.Tensor | None = None,
    seglen: torch.Tensor | None = None,
    blocksum: torch.Tensor | None = None,
    sink: int = 0,
    window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold decisions of a flat lookup from its per-key logits (the reference of kernels/decide.py).

    logits [B, Hk, Q, C] per-key log-scores; parts [B, Hk, P, Q] partial log-normalisers (log Z_q is their
    logsumexp, plus ``fixed_logz`` [B, Hk, Q] when given); threshold [Hk]; sizes [Hk, C]. Returns probs
    [B, Hk, C] float32 = mean_q exp(logit - log Z_q) and keep = probs >= threshold (bool). With ``seglen``
    [B, Hk, C + 2] it writes the kept segment lengths (sinks, kept sizes, window) and into ``blocksum``
    [B, Hk, NB] the sum of each block of segments; the block size is the power of two that splits the C + 2
    segments into NB blocks (the positions kernel's ``segment_block``).
    """
    logz = torch.logsumexp(parts.float(), dim=2)  # [B, Hk, Q]
    if fixed_logz is not None:
        logz = torch.logaddexp(logz, fixed_logz.float())
    probs = torch.exp(logits.float() - logz.unsqueeze(-1)).mean(dim=2)
    keep = probs >= threshold.float().view(1, -1, 1)
    if seglen is not None:
        b, hk, c = probs.shape
        lengths = torch.cat([torch.full((b, hk, 1), sink, dtype=torch.int64, device=probs.device),
                             torch.where(keep, sizes.unsqueeze(0).to(torch.int64), 0),
                             torch.full((b, hk, 1), window, dtype=torch.int64, device=probs.device)], dim=2)
        seglen.copy_(lengths)
        if blocksum is not None:
            nblk = blocksum.shape[-1]
            block = 1 << max(-(-(c + 2) // nblk) - 1, 0).bit_length()
            padded = torch.nn.functional.pad(lengths, (0, nblk * block - (c + 2)))
            blocksum.copy_(padded.view(b, hk, nblk, block).sum(-1))
    return probs, keep


def centroid_lookup_ref(
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
    fine_centroid_scales: torch.Tensor | None = None,
    coarse_centroid_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which fine clusters to keep, by coarse-then-fine centroid lookup.

    Args:
        q: [B, Hk, Q, D] grouped queries (see ``group_queries_ref``), any float dtype.
        fine_centroids: [Hk, Cf, D]; fine_sizes: [Hk, Cf] int64 (keys per cluster, >= 1).
        coarse_centroids: [Hk, Cc, D]; coarse_sizes: [Hk, Cc] int64 (keys per coarse cluster).
        coarse_offsets: [Hk, Cc + 1] int64, range of fine cluster indices of each coarse cluster.
        fine_threshold / coarse_threshold: [Hk] float32 per-key probability thresholds (threshold mode), or None.
        budget / coarse_budget: [B, Hk] float32 numbers of keys to keep at the fine / coarse level (budget mode),
            or None. Exactly one of ``fine_threshold`` and ``budget`` is given.
        scale: softmax scale (1 / sqrt(D)).
        hierarchical: False scores every fine centroid (flat lookup) and ignores the coarse level.
        fine_spread / coarse_spread: [Hk, Cf] / [Hk, Cc] per-dimension key variance of each cluster, or None.
        fixed_logz: [B, Hk, Q] exact log-normaliser of the always-attended keys (``always_logz_ref``), or None.
        fine_centroid_scales / coarse_centroid_scales: [Hk, D] fp32 scales when the centroid table is float8
            e4m3 (``centroid_fp8.quantize_centroids``): the lookup scores the dequantised table.

    The per-key probability estimate of cluster j for query q is exp(l_j) / Z_q with the logit
    l_j = s q.c_j (+ s^2 |q|^2 v_j / 2 with spreads) and Z_q = sum_k n_k exp(l_k) (+ exp(fixed_logz)); in
    hierarchical mode Z_q sums fine terms inside kept coarse clusters and coarse terms for the others.
    Estimates are averaged over the queries of each KV head.

    Returns:
        keep: [B, Hk, Cf] bool, fine clusters to attend.
        centroids_read: [B, Hk] int64, centroids scored (coarse + fine) per head, for the KV budget.
    """
    if (fine_threshold is None) == (budget is None):
        raise ValueError("give exactly one of fine_threshold and budget")
    if fine_centroid_scales is not None:
        fine_centroids = dequantize_centroids(fine_centroids, fine_centroid_scales)
    if coarse_centroid_scales is not None and hierarchical:
        coarse_centroids = dequantize_centroids(coarse_centroids, coarse_centroid_scales)
    qf = q.float()
    b, hk, nq, d = qf.shape
    cf = fine_centroids.shape[1]
    fine_log_sizes = fine_sizes.float().log().view(1, hk, 1, cf)
    fine_logits = scale * torch.einsum("bhqd,hcd->bhqc", qf, fine_centroids.float())  # [B, Hk, Q, Cf]
    fine_logits = fine_logits + _spread_term(qf, fine_spread, scale)
    if not hierarchical:
        fine_probs = _per_key_probs(fine_logits, fine_log_sizes, fixed_logz)
        allowed = torch.ones(b, hk, cf, dtype=torch.bool, device=q.device)
        read = torch.full((b, hk), cf, dtype=torch.int64, device=q.device)
    else:
        cc = coarse_centroids.shape[1]
        coarse_log_sizes = coarse_sizes.float().log().view(1, hk, 1, cc)
        coarse_logits = scale * torch.einsum("bhqd,hcd->bhqc", qf, coarse_centroids.float())  # [B, Hk, Q, Cc]
        coarse_logits = coarse_logits + _spread_term(qf, coarse_spread, scale)
        coarse_probs = _per_key_probs(coarse_logits, coarse_log_sizes, fixed_logz)  # [B, Hk, Cc]
        if fine_threshold is not None:
            coarse_keep = coarse_probs >= coarse_threshold.view(1, hk, 1)
        else:
            allowed_c = torch.ones_like(coarse_probs, dtype=torch.bool)
            coarse_keep = _budget_mask(coarse_probs, coarse_sizes, allowed_c, coarse_budget)
        parent = _fine_parent(coarse_offsets, cf)  # [Hk, Cf]
        allowed = coarse_keep.gather(-1, parent.unsqueeze(0).expand(b, hk, cf))  # [B, Hk, Cf]
        # Denominator: fine terms of kept coarse clusters + coarse terms of the dropped ones.
        dropped = torch.where(~coarse_keep.unsqueeze(2), coarse_logits + coarse_log_sizes, NEG_INF)
        extra = torch.logsumexp(dropped, dim=-1)  # [B, Hk, Q]
        if fixed_logz is not None:
            extra = torch.logaddexp(extra, fixed_logz.float())
        masked = torch.where(allowed.unsqueeze(2), fine_logits, NEG_INF)
        fine_probs = _per_key_probs(masked, fine_log_sizes, extra)
        read = cc + allowed.sum(-1)
    if fine_threshold is not None:
        keep = allowed & (fine_probs >= fine_threshold.view(1, hk, 1))
    else:
        keep = _budget_mask(fine_probs, fine_sizes, allowed, budget)
    return keep, read.to(torch.int64)


def _fine_parent(coarse_offsets: torch.Tensor, num_fine: int) -> torch.Tensor:
    """[Hk, Cc + 1] fine index ranges -> [Hk, Cf] coarse parent of each fine cluster."""
    idx = torch.arange(num_fine, device=coarse_offsets.device).expand(coarse_offsets.shape[0], num_fine)
    return torch.searchsorted(coarse_offsets[:, 1:].contiguous(), idx.contiguous(), right=True)


def compact_fine_ref(keep_c: torch.Tensor, coarse_offsets: torch.Tensor, num_fine: int
                     ) -> tuple[list[list[torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Fine clusters under kept coarse clusters (``compaction.compact_fine``): keep_c [B, Hk, Cc] bool,
    coarse_offsets [Hk, Cc + 1] -> per (b, h) the sorted fine indices (int32), count [B, Hk] int32 and the
    allowed mask [B, Hk, Cf] uint8."""
    b, hk, _ = keep_c.shape
    parent = _fine_parent(coarse_offsets, num_fine)
    allowed = keep_c.bool().gather(-1, parent.unsqueeze(0).expand(b, hk, num_fine))
    lists = [[allowed[i, h].nonzero().flatten().to(torch.int32) for h in range(hk)] for i in range(b)]
    return lists, allowed.sum(-1).to(torch.int32), allowed.to(torch.uint8)
