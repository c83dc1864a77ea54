"""Torch references of every kernel op. Each Triton kernel in this package has the same signature.

Shapes: ``B`` questions sharing one fixed context, ``Hq`` query heads, ``Hk`` KV heads (``G = Hq // Hk``),
``T`` query tokens, ``Q = G * T`` queries per KV head, ``N`` fixed tokens, ``D`` head dim,
``Cf`` / ``Cc`` fine / coarse clusters per head, ``R`` kept ranges (padded).
Everything returned is float32 (or int64 for indices) whatever the input dtype.
"""

from __future__ import annotations

import torch

from .centroid_fp8 import dequantize_centroids

__all__ = [
    "group_queries_ref",
    "compact_fine_ref",
    "always_logz_ref",
    "budget_mask_ref",
    "decide_from_logits_ref",
    "centroid_lookup_ref",
    "ranges_from_mask_ref",
    "sparse_attention_ref",
    "ranges_to_index_ref",
    "causal_attention_ref",
    "slotted_causal_attention_ref",
    "lse_merge_ref",
    "sparse_attention_with_new_tokens_ref",
]

NEG_INF = float("-inf")


def check_scale(scale) -> None:
    """Attention takes a positive softmax scale (the Triton kernels keep their running max in raw q.k units,
    which needs one; the references hold the same contract)."""
    if not scale > 0:
        raise ValueError(f"scale must be a positive softmax scale (e.g. head_dim ** -0.5); got {scale!r}")


def group_queries_ref(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, T, D] -> [B, Hk, G*T, D]: the queries each KV head serves (head-major within a group)."""
    b, hq, t, d = q.shape
    return q.reshape(b, num_kv_heads, (hq // num_kv_heads) * t, d)


def always_logz_ref(q: torch.Tensor, keys: torch.Tensor, sink_tokens: int, window_tokens: int, scale: float
                    ) -> torch.Tensor:
    """log sum_k exp(s q.k) over the always-attended keys (the first ``sink_tokens`` and last ``window_tokens``
    sorted positions): q [B, Hk, Q, D] grouped queries, keys [Hk, N, D] -> [B, Hk, Q] float32 (-inf if none).

    The exact part of the lookup's normaliser: the estimate over clusters is then a share of all the
    fixed context's attention, so a head whose mass sits on the sinks does not outvote its group.
    """
    n = keys.shape[1]
    s = min(sink_tokens, n)
    b, hk, nq, _ = q.shape
    if s + min(window_tokens, n - s) == 0:
        return torch.full((b, hk, nq), NEG_INF, dtype=torch.float32, device=q.device)
    k = torch.cat([keys[:, :s], keys[:, max(n - window_tokens, s):]], dim=1).float()  # [Hk, S + W, D], on device
    return torch.logsumexp(scale * torch.einsum("bhqd,hkd->bhqk", q.float(), k), dim=-1)


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


def ranges_from_mask_ref(
    keep: torch.Tensor, fine_offsets: torch.Tensor, num_tokens: int, sink_tokens: int, window_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact kept fine clusters (plus sinks and window) into sorted, coalesced [start, end) ranges.

    Args:
        keep: [B, Hk, Cf] bool; fine_offsets: [Hk, Cf + 1] int64 sorted positions.
    Returns:
        starts, ends: [B, Hk, R] int64 (padding entries have start == end == 0), counts: [B, Hk] int64.
    """
    b, hk, cf = keep.shape
    dev = keep.device
    lo = fine_offsets[:, :-1].unsqueeze(0).expand(b, hk, cf)
    hi = fine_offsets[:, 1:].unsqueeze(0).expand(b, hk, cf)
    # Segments: sinks, clusters, window; a segment is live if kept and non-empty.
    sink = torch.tensor([0, sink_tokens], device=dev)
    win = torch.tensor([num_tokens - window_tokens, num_tokens], device=dev)
    seg_lo = torch.cat([sink[0].expand(b, hk, 1), lo, win[0].expand(b, hk, 1)], dim=-1)
    seg_hi = torch.cat([sink[1].expand(b, hk, 1), hi, win[1].expand(b, hk, 1)], dim=-1)
    live = torch.cat([torch.ones(b, hk, 1, dtype=torch.bool, device=dev), keep,
                      torch.ones(b, hk, 1, dtype=torch.bool, device=dev)], dim=-1) & (seg_hi > seg_lo)
    # A live segment opens a range unless the previous segment was live and ends where it starts.
    prev_live = torch.cat([torch.zeros_like(live[..., :1]), live[..., :-1]], dim=-1)
    prev_hi = torch.cat([torch.full_like(seg_hi[..., :1], -1), seg_hi[..., :-1]], dim=-1)
    opens = live & ~(prev_live & (prev_hi == seg_lo))
    next_live = torch.cat([live[..., 1:], torch.zeros_like(live[..., :1])], dim=-1)
    next_lo = torch.cat([seg_lo[..., 1:], torch.full_like(seg_lo[..., :1], -1)], dim=-1)
    closes = live & ~(next_live & (next_lo == seg_hi))
    counts = opens.sum(-1)
    r = max(int(counts.max().item()) if counts.numel() else 0, 1)
    starts = torch.zeros(b, hk, r, dtype=torch.int64, device=dev)
    ends = torch.zeros(b, hk, r, dtype=torch.int64, device=dev)
    slot_open = torch.cumsum(opens, -1) - 1
    slot_close = torch.cumsum(closes, -1) - 1
    bi, hi_, si = opens.nonzero(as_tuple=True)
    starts[bi, hi_, slot_open[bi, hi_, si]] = seg_lo[bi, hi_, si]
    bi, hi_, si = closes.nonzero(as_tuple=True)
    ends[bi, hi_, slot_close[bi, hi_, si]] = seg_hi[bi, hi_, si]
    return starts, ends, counts.to(torch.int64)


def ranges_to_index_ref(starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Concatenated positions of the ranges [starts[i], ends[i]) (1-D int64 tensors) as one int64 tensor."""
    lens = (ends - starts).clamp(min=0)
    total = int(lens.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64, device=starts.device)
    first = torch.cumsum(lens, 0) - lens  # output offset of each range
    owner = torch.repeat_interleave(torch.arange(lens.numel(), device=starts.device), lens)
    return starts[owner] + torch.arange(total, device=starts.device) - first[owner]


def sparse_attention_ref(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    counts: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of every query token over the kept fixed-context ranges (no causal mask: the whole
    fixed context precedes the queries).

    Args:
        q: [B, Hq, T, D]; keys, values: [Hk, N, D] sorted order; starts, ends: [B, Hk, R]; counts: [B, Hk].
    Returns:
        out: [B, Hq, T, D] float32 (zeros where nothing is kept), lse: [B, Hq, T] float32 (-inf where nothing is kept).
    """
    check_scale(scale)
    b, hq, t, d = q.shape
    hk, n, _ = keys.shape
    g = hq // hk
    out = torch.zeros(b, hq, t, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, t), NEG_INF, dtype=torch.float32, device=q.device)
    for bi in range(b):
        for h in range(hk):
            c = int(counts[bi, h])
            if c == 0:
                continue
            idx = ranges_to_index_ref(starts[bi, h, :c], ends[bi, h, :c])
            if idx.numel() == 0:
                continue
            k = keys[h].index_select(0, idx).float()  # [M, D]
            v = values[h].index_select(0, idx).float()
            qh = q[bi, h * g:(h + 1) * g].float()  # [G, T, D]
            s = torch.matmul(qh, k.t()) * scale  # [G, T, M]
            m = torch.logsumexp(s, dim=-1)  # [G, T]
            out[bi, h * g:(h + 1) * g] = torch.matmul(torch.exp(s - m.unsqueeze(-1)), v)
            lse[bi, h * g:(h + 1) * g] = m
    return out, lse


def causal_attention_ref(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the T newest tokens over the M >= T dynamic (question + generated) tokens.

    Args:
        q: [B, Hq, T, D]; keys, values: [B, Hk, M, D]; query i sits at dynamic position M - T + i.
    Returns:
        out [B, Hq, T, D] float32, lse [B, Hq, T] float32.
    """
    b, hq, t, d = q.shape
    hk, m_len = keys.shape[1], keys.shape[2]
    g = hq // hk
    k = keys.float().repeat_interleave(g, dim=1)
    v = values.float().repeat_interleave(g, dim=1)
    s = torch.matmul(q.float(), k.transpose(-1, -2)) * scale  # [B, Hq, T, M]
    qpos = torch.arange(m_len - t, m_len, device=q.device).view(t, 1)
    kpos = torch.arange(m_len, device=q.device).view(1, m_len)
    s = s.masked_fill(kpos > qpos, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v)
    return out, lse


def lse_merge_ref(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial softmax attentions over disjoint key sets.

    Args:
        out_a, out_b: [..., D] float32 normalised partial outputs; lse_a, lse_b: [...] their log-sum-exps
        (-inf for an empty part; both empty gives zeros).
    Returns:
        out [..., D] float32, lse [...] float32.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.exp(lse_a - safe).unsqueeze(-1)
    wb = torch.exp(lse_b - safe).unsqueeze(-1)
    return wa * out_a + wb * out_b, lse


def slotted_causal_attention_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of T new-token queries over a buffer of new-token keys, causally by slot.

    query [B, Hq, T, D]; key/value [B, Hk, C, D]; slots [T] int64: query t sees buffer entries 0 .. slots[t]
    (a static buffer of capacity C, or a growing cache's M entries with slots M - T .. M - 1, which is
    ``causal_attention_ref``). Returns out [B, Hq, T, D] and lse [B, Hq, T], float32."""
    b, hq, t, d = query.shape
    hk, c = key.shape[1], key.shape[2]
    q = query.float().reshape(b, hk, (hq // hk) * t, d)
    logits = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [B, Hk, G*T, C]
    seen = torch.arange(c, device=query.device).view(1, c) <= slots.view(t, 1)  # [T, C]
    logits = logits.masked_fill(~seen.repeat(hq // hk, 1).view(1, 1, (hq // hk) * t, c), NEG_INF)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), value.float())
    return out.reshape(b, hq, t, d), lse.reshape(b, hq, t)


def sparse_attention_with_new_tokens_ref(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pos: torch.Tensor,
    total: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    slots: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of T new tokens over the kept fixed-context keys plus, causally by slot, the new tokens.

    Args:
        q: [B, Hq, T, D]; keys, values: [Hk, N, D] sorted order; pos: [B, Hk, >= max total] sorted kept
            positions, total: [B, Hk] kept keys per head (entries of pos past total are ignored);
        new_keys, new_values: [B, Hk, C, D]; slots: [T], query t sees new entries 0 .. slots[t].
    Returns:
        out [B, Hq, T, D] float32, lse [B, Hq, T] float32 (log-sum-exp over both parts).
    """
    b, hq, t, d = q.shape
    hk = keys.shape[0]
    g = hq // hk
    out_f = torch.zeros(b, hq, t, d, dtype=torch.float32, device=q.device)
    lse_f = torch.full((b, hq, t), NEG_INF, dtype=torch.float32, device=q.device)
    for bi in range(b):
        for h in range(hk):
            idx = pos[bi, h, :int(total[bi, h])].long()
            if idx.numel() == 0:
                continue
            s = torch.matmul(q[bi, h * g:(h + 1) * g].float(), keys[h, idx].float().t()) * scale  # [G, T, M]
            lse_f[bi, h * g:(h + 1) * g] = torch.logsumexp(s, dim=-1)
            out_f[bi, h * g:(h + 1) * g] = torch.matmul(torch.softmax(s, dim=-1), values[h, idx].float())
    out_n, lse_n = slotted_causal_attention_ref(q, new_keys, new_values, slots, scale)
    return lse_merge_ref(out_f, lse_f, out_n, lse_n)
