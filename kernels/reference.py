"""Torch references of every kernel op. Each Triton kernel in this package has the same signature (the
lookup's references are in ``reference_lookup.py`` and re-exported here).

Shapes: ``B`` questions sharing one fixed context, ``Hq`` query heads, ``Hk`` KV heads (``G = Hq // Hk``),
``T`` query tokens, ``Q = G * T`` queries per KV head, ``N`` fixed tokens, ``D`` head dim,
``Cf`` / ``Cc`` fine / coarse clusters per head, ``R`` kept ranges (padded).
Everything returned is float32 (or int64 for indices) whatever the input dtype.
"""

from __future__ import annotations

import torch

from .reference_lookup import (  # the lookup's references live there; re-exported here
    budget_mask_ref,
    centroid_lookup_ref,
    compact_fine_ref,
    decide_from_logits_ref,
)

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
