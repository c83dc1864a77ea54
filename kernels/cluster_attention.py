"""Sparse attention straight over the kept segments of a flat decode lookup: no positions list.

The positions path (``positions.kept_positions`` + ``sparse_attention.sparse_attention_positions``) writes
the sorted position of every kept key and then splits the kept keys evenly over programs. Here a program
owns *segments* instead (sinks, fine clusters, window; a cluster's keys are contiguous in memory, DESIGN
section 3). For each chunk of ``CHUNK`` of its segments it

1. gets the kept length of its segments: read from ``seglen`` (any lookup that writes it, e.g. the budget
   search), or decided in the kernel from the flat lookup's stored logits against the per-head threshold
   (the same arithmetic as ``decide.decide_from_logits``: ``_head_logz``, ``_cluster_probs``,
   ``_segment_lengths``);
2. compacts its kept keys in registers (inclusive cumsum of the lengths; kept key ``i`` of the chunk lies
   in the segment whose [exclusive, inclusive) sums hold ``i``), so K/V tiles are gathered as whole rows
   with no position read from memory and nothing that the next tile's loads wait on;
3. runs the online softmax of the group's queries over those tiles (``sparse_attention._attend_tile``).

Program ``(p, b*h)`` owns segments ``p, p + P, p + 2P, ...`` of its head, taken ``CHUNK`` at a time (strided
one segment at a time: the kept clusters come in runs of neighbours, and a contiguous share of them left
some programs 4-5x the mean work at Llama-3-8B 128K) and writes one normalised partial (out, lse);
``sparse_attention.reduce_splits`` or the fused epilogue (``fused_attention.merge_with_new_tokens``) merges
the ``P`` partials. The decisions, the positions and the split-K attention of a decode step are one launch
here instead of three. Torch twin: ``reference.cluster_attention_ref``. No host sync: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decide import _cluster_probs, _head_logz, _segment_lengths
from .sparse_attention import _LOG2E, _attend_tile, _check_scale, _cumsum, _interpret, _num_sms, _sum, reduce_splits

__all__ = ["cluster_attention", "flat_lookup_attention", "TUNING"]

# Launch settings on a GPU (benchmarks/gpu_cluster_attention.py sweeps them): segments per chunk, programs
# for the whole grid as a multiple of the multiprocessors (at most one per segment), keys per tile, warps,
# pipeline stages.
TUNING = {"chunk": 64, "programs": 4, "block_n": 64, "num_warps": 4, "num_stages": 2}


@triton.jit
def _cluster_attn_kernel(
    Q, K, V, LOWS, SEGLEN, LOGITS, PART, FIXED, THR, SIZES, OUT, LSE, COUNT,
    s_qb, s_qh, s_qm, s_kh, s_kn, s_vh, s_vn, s_lh, s_eb, s_eh, s_gb, s_gh, s_gq, s_pb, s_ph, s_pk,
    s_fb, s_fh, s_sh, s_ob, s_oh, s_os, s_om, s_zb, s_zh, s_zs,
    HK, NQ, NC, NB, SINK, WINDOW, NPROG, qk_scale, TOKEN_BYTES, HEAD_BYTES, DENSE_BYTES,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, DECIDE: tl.constexpr,
    HAS_FIXED: tl.constexpr, HAS_COUNT: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (p, b*h): segments p, p + NPROG, p + 2 NPROG, ... of head h, CHUNK at a time -> partial p."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    nseg = NC + 2
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, CHUNK)
    m_ok = offs_m < NQ
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if DECIDE:
        offs_q = tl.arange(0, BLOCK_Q)
        q_ok = offs_q < NQ
        logz = _head_logz(PART + b * s_pb + h * s_ph, s_pk, NB, FIXED + b * s_fb + h * s_fh, offs_q, q_ok,
                          HAS_FIXED, BLOCK_P, BLOCK_Q)
        thr = tl.load(THR + h)
    k_base = K + h * s_kh
    v_base = V + h * s_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    kept = _sum(tl.full([CHUNK], 0, tl.int32), axis=0)
    per = (nseg - pid + NPROG - 1) // NPROG  # segments pid, pid + NPROG, ... of this program
    for j in range(0, per, CHUNK):
        g = (j + offs_g) * NPROG + pid
        g_ok = g < nseg
        if DECIDE:
            c = g - 1
            c_ok = (g >= 1) & (c < NC)
            p = _cluster_probs(LOGITS + b * s_gb + h * s_gh, s_gq, logz, c, c_ok, offs_q, q_ok, NQ)
            ln = tl.where(g_ok, _segment_lengths(c_ok & (p >= thr), SIZES + h * s_sh, g, c, c_ok, NC, SINK, WINDOW), 0)
        else:
            ln = tl.load(SEGLEN + b * s_eb + h * s_eh + g, mask=g_ok, other=0)
        incl = _cumsum(ln, axis=0)
        excl = incl - ln
        shift = tl.load(LOWS + h * s_lh + g, mask=g_ok, other=0) - excl  # position = chunk index + shift
        tot = _sum(ln, axis=0)
        kept += tot
        for start in range(0, tot, BLOCK_N):
            idx = start + offs_n
            inside = (excl[None, :] <= idx[:, None]) & (idx[:, None] < incl[None, :])  # [BLOCK_N, CHUNK]
            pos = (idx + _sum(tl.where(inside, shift[None, :], 0), axis=1)).to(tl.int64)
            m_i, l_i, acc = _attend_tile(q, k_base + pos[:, None] * s_kn + offs_d[None, :],
                                         v_base + pos[:, None] * s_vn + offs_d[None, :], idx < tot, d_ok,
                                         m_i, l_i, acc, qk_scale, UPCAST)
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o_ptr = OUT + b * s_ob + h * s_oh + pid * s_os + offs_m[:, None] * s_om + offs_d[None, :]
    tl.store(o_ptr, acc / l_safe[:, None], mask=m_ok[:, None] & d_ok[None, :])
    lse = tl.where(has, (m_i * qk_scale + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + b * s_zb + h * s_zh + pid * s_zs + offs_m, lse, mask=m_ok)
    if HAS_COUNT:  # the KV budget: kept keys' bytes, and once per head the centroids' and the dense bytes
        first = (pid == 0).to(tl.int64)
        one = tl.arange(0, 1)
        tl.atomic_add(COUNT + one, kept.to(tl.int64) * TOKEN_BYTES + first * HEAD_BYTES + tl.full([1], 0, tl.int64))
        tl.atomic_add(COUNT + 1 + one, first * DENSE_BYTES + tl.full([1], 0, tl.int64))


def _launch_config(nq: int, device: torch.device) -> dict:
    if _interpret() or device.type != "cuda":
        return dict(chunk=16, programs=2, block_n=16, num_warps=4, num_stages=1)
    return dict(TUNING)


def cluster_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    seg_lows: torch.Tensor,
    scale: float,
    *,
    seglen: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    parts: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
    fixed_logz: torch.Tensor | None = None,
    sink: int = 0,
    window: int = 0,
    counter: tuple | None = None,
    num_scored: int = 0,
    reduce: bool = True,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of q over the kept segments of the clustered fixed context (Triton; same arguments
    and results as ``reference.cluster_attention_ref``).

    The kept segments come either from ``seglen`` or, with ``logits``/``parts``/``threshold``/``sizes``
    (a flat few-query lookup's stored logits, ``lookup._Level.lse``), from threshold decisions taken in the
    kernel, exactly as ``decide.decide_from_logits`` takes them.

    Args:
        q: [B, Hq, T, D] with G * T <= 16 grouped query rows per KV head; keys, values: [Hk, N, D].
        seg_lows: [Hk, C + 2] int32 first sorted position of each segment (``positions.segment_lows``).
        scale: softmax scale (> 0).
        seglen: [B, Hk, C + 2] int32 kept length of each segment (sinks, fine clusters, window).
        logits: [B, Hk, G * T, C] float32; parts: [B, Hk, P, G * T] float32 partial log-normalisers;
            threshold: [Hk]; sizes: [Hk, C] integer; fixed_logz: optional [B, Hk, G * T]; sink, window:
            always-attended tokens at the start and the end.
        counter: optional ``(acc, token_bytes, centroid_bytes, dense_bytes)``: adds kept keys * token_bytes
            + num_scored * centroid_bytes to ``acc[0]`` and dense_bytes to ``acc[1]`` per (b, h), as
            ``positions.kept_positions`` does (acc: int64 [2] on the device).
        reduce: False returns the partials out [B, Hk, P, G * T, D], lse [B, Hk, P, G * T] (normalised per
            program) for an epilogue that merges them, e.g. ``fused_attention.merge_with_new_tokens``.
        config: overrides of the launch settings (``TUNING`` keys), for tuning.
    Returns:
        out [B, Hq, T, D] float32 (zeros where nothing is kept), lse [B, Hq, T] float32 (-inf there).
    """
    _check_scale(scale)
    b, hq, t, d = q.shape
    hk, n, _ = keys.shape
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hk})")
    nq = (hq // hk) * t
    if nq > 16:
        raise ValueError(f"cluster_attention serves decode: at most 16 grouped query rows per KV head; got "
                         f"{nq} (use sparse_attention_positions for longer question blocks)")
    if seg_lows.dim() != 2 or seg_lows.shape[0] != hk or seg_lows.dtype != torch.int32:
        raise ValueError(f"seg_lows must be int32 [Hk={hk}, C + 2] (positions.segment_lows); got "
                         f"{seg_lows.dtype} {tuple(seg_lows.shape)}")
    nseg = seg_lows.shape[1]
    decide = seglen is None
    if decide:
        if logits is None or parts is None or threshold is None or sizes is None:
            raise ValueError("give seglen, or logits, parts, threshold and sizes for decisions in the kernel")
        if logits.shape != (b, hk, nq, nseg - 2) or parts.dim() != 4 or parts.shape[:2] != (b, hk) \
                or parts.shape[3] != nq:
            raise ValueError(f"logits must be [B, Hk, G*T, C] = [{b}, {hk}, {nq}, {nseg - 2}] and parts "
                             f"[B, Hk, P, G*T]; got {tuple(logits.shape)} and {tuple(parts.shape)}")
        if threshold.numel() != hk or sizes.shape != (hk, nseg - 2):
            raise ValueError(f"threshold must be [Hk={hk}] and sizes [Hk, C] = [{hk}, {nseg - 2}]; got "
                             f"{tuple(threshold.shape)} and {tuple(sizes.shape)}")
        if fixed_logz is not None and fixed_logz.shape != (b, hk, nq):
            raise ValueError(f"fixed_logz must be [B, Hk, G*T] = [{b}, {hk}, {nq}]; got {tuple(fixed_logz.shape)}")
    elif seglen.shape != (b, hk, nseg) or seglen.dtype != torch.int32:
        raise ValueError(f"seglen must be int32 [B, Hk, C + 2] = [{b}, {hk}, {nseg}]; got {seglen.dtype} "
                         f"{tuple(seglen.shape)}")
    acc_t, token_bytes, cent_bytes, dense_bytes = counter if counter is not None else (None, 0, 0, 0)
    if counter is not None and (acc_t.dtype != torch.int64 or acc_t.numel() < 2):
        raise ValueError(f"counter[0] must be an int64 tensor of 2 entries; got {acc_t.dtype} {tuple(acc_t.shape)}")
    dev = q.device
    cfg = _launch_config(nq, dev)
    cfg.update(config or {})
    nprog = max(1, min(nseg, triton.cdiv(cfg["programs"] * _num_sms(dev), b * hk)))
    q = q if q.is_contiguous() else q.contiguous()
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    values = values if values.stride(-1) == 1 else values.contiguous()
    qg = q.view(b, hk, nq, d)
    lows = seg_lows if seg_lows.stride(-1) == 1 else seg_lows.contiguous()
    part_o = torch.empty(b, hk, nprog, nq, d, dtype=torch.float32, device=dev)
    part_l = torch.empty(b, hk, nprog, nq, dtype=torch.float32, device=dev)
    if decide:
        logits = logits.float()
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        parts = parts.float()
        parts = parts if parts.stride(-1) == 1 else parts.contiguous()
        thr = threshold.float().contiguous().view(hk)
        sizes = sizes.contiguous()
        fz = fixed_logz.float().contiguous() if fixed_logz is not None else part_l
        seg = part_l
    else:
        logits = parts = thr = sizes = fz = part_l
        seg = seglen if seglen.stride(-1) == 1 else seglen.contiguous()
    count = acc_t if counter is not None else part_l
    upcast = _interpret() or q.dtype != keys.dtype or keys.dtype != values.dtype
    _cluster_attn_kernel[(nprog, b * hk)](
        qg, keys, values, lows, seg, logits, parts, fz, thr, sizes, part_o, part_l, count,
        qg.stride(0), qg.stride(1), qg.stride(2), keys.stride(0), keys.stride(1), values.stride(0),
        values.stride(1), lows.stride(0), seg.stride(0), seg.stride(1), logits.stride(0), logits.stride(1),
        logits.stride(2), parts.stride(0), parts.stride(1), parts.stride(2), fz.stride(0), fz.stride(1),
        sizes.stride(0), part_o.stride(0), part_o.stride(1), part_o.stride(2), part_o.stride(3),
        part_l.stride(0), part_l.stride(1), part_l.stride(2),
        hk, nq, nseg - 2, parts.shape[2] if decide else 0, sink, window, nprog, scale * _LOG2E,
        token_bytes, num_scored * cent_bytes, dense_bytes,
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=16, BLOCK_N=cfg["block_n"], CHUNK=cfg["chunk"],
        BLOCK_Q=max(2, triton.next_power_of_2(nq)),
        BLOCK_P=min(triton.next_power_of_2(max(parts.shape[2], 1)), 64) if decide else 2,
        DECIDE=decide, HAS_FIXED=decide and fixed_logz is not None, HAS_COUNT=counter is not None,
        UPCAST=upcast, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not reduce:
        return part_o, part_l
    out = torch.empty(b, hq, t, d, dtype=torch.float32, device=dev)
    lse = torch.empty(b, hq, t, dtype=torch.float32, device=dev)
    reduce_splits(part_o, part_l, out, lse)
    return out, lse


def flat_lookup_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    fine_centroids: torch.Tensor,
    fine_sizes: torch.Tensor,
    seg_lows: torch.Tensor,
    scale: float,
    *,
    fine_threshold: torch.Tensor | None = None,
    budget: torch.Tensor | None = None,
    sink_tokens: int = 0,
    window_tokens: int = 0,
    fine_spread: torch.Tensor | None = None,
    fixed_logz: torch.Tensor | None = None,
    always_keys: tuple | None = None,
    budget_slack: float = 0.0,
    counter: tuple | None = None,
    reduce: bool = True,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole squeezed decode attention with a flat lookup in two or three launches: the lookup's
    normaliser launch (logits of every fine centroid, ``lookup._Level.lse``), in budget mode the budget
    search (``budget.budget_mask_from_logits``, kept lengths), then ``cluster_attention`` (threshold mode:
    the decisions in the same launch). Same selection as ``lookup.centroid_lookup_positions`` with
    ``hierarchical=False`` followed by ``sparse_attention_positions``; same result as
    ``reference.centroid_lookup_ref`` + ``sparse_attention_ref`` (tests/test_kernels.py).

    Args:
        q: [B, Hq, T, D] with G * T <= 16; keys, values [Hk, N, D]; fine_centroids [Hk, C, D]; fine_sizes
            [Hk, C]; seg_lows [Hk, C + 2] int32 (``positions.segment_lows``).
        fine_threshold: [Hk] per-key probability thresholds, or budget: [B, Hk] keys to keep (exactly one).
        fine_spread, fixed_logz, always_keys, budget_slack: as ``lookup.centroid_lookup_positions``.
        counter: as ``cluster_attention`` (the C centroids scored per head are counted).
        reduce: False returns the partials for an epilogue (``fused_attention.merge_with_new_tokens``).
    """
    from .budget import budget_mask_from_logits
    from .lookup import FEW_QUERIES, _Level

    if (fine_threshold is None) == (budget is None):
        raise ValueError("give exactly one of fine_threshold and budget")
    if always_keys is not None and fixed_logz is not None:
        raise ValueError("give at most one of fixed_logz and always_keys")
    b, hq, t, d = q.shape
    hk, n, _ = keys.shape
    if hq % hk or (hq // hk) * t > FEW_QUERIES:
        raise ValueError(f"flat_lookup_attention serves decode: Hq ({hq}) a multiple of Hk ({hk}) and at most "
                         f"{FEW_QUERIES} grouped rows; got {(hq // hk) * t} (use centroid_lookup_positions)")
    if always_keys is not None and always_keys[0].dtype != fine_centroids.dtype:
        from .always_logz import always_logz  # the launch scores keys as centroids: same dtype needed

        fixed_logz, always_keys = always_logz(q.reshape(b, hk, -1, d), *always_keys, scale), None
    grouped = q.reshape(b, hk, (hq // hk) * t, d)
    fine = _Level(grouped, fine_centroids, fine_sizes, scale, "ieee", spread=fine_spread, flat_fine=True)
    parts, _, logits = fine.lse(always=always_keys)
    c = fine_centroids.shape[1]
    common = dict(counter=counter, num_scored=c, reduce=reduce, config=config)
    if budget is not None:
        seglen = torch.empty(b, hk, c + 2, dtype=torch.int32, device=q.device)
        budget_mask_from_logits(logits, parts, fixed_logz, fine_sizes, budget, seglen=seglen, sink=sink_tokens,
                                window=window_tokens, slack=budget_slack)
        return cluster_attention(q, keys, values, seg_lows, scale, seglen=seglen, **common)
    return cluster_attention(q, keys, values, seg_lows, scale, logits=logits, parts=parts, threshold=fine_threshold,
                             sizes=fine_sizes, fixed_logz=fixed_logz, sink=sink_tokens, window=window_tokens,
                             **common)
