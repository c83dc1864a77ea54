"""Threshold decisions of a flat few-query lookup straight from its stored logits, in segment order.

A flat decode lookup (``lookup._Level.lse``) leaves, per (question, KV head), the partial log-normalisers
of its programs and the per-key log-score of every fine centroid for every grouped query. The decisions
then need only: log Z per query (the partials' logsumexp), the per-key probability estimate
``mean_q exp(logit - log Z_q)`` of every cluster, ``>= threshold``, and the kept segment lengths (sinks,
kept cluster sizes, window) for ``positions.kept_positions``.

``decide_from_logits`` does that in one launch over blocks of *segments* (the block size of the positions
kernel, ``positions.segment_block``), and also writes each block's kept-key sum, so the positions kernel
finds the keys kept before its block with one short sum instead of re-reading every earlier segment
length. It replaces the general probability launch (``_prob_kernel``: a partial-sum pass, a barrier and a
re-read) on this path. Torch twin: ``reference.decide_from_logits_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chain import chain_enter, chain_launch
from .lookup_kernels import _head_logz
from .positions import TUNING as POSITIONS_TUNING
from .positions import _finish_head, segment_block
from .sparse_attention import _cumsum, _interpret, _max, _sum

__all__ = ["decide_from_logits", "decide_positions", "decide_positions_scratch"]


@triton.jit
def _cluster_probs(LOGITS_ROW, s_gq, logz, c, c_ok, offs_q, q_ok, NQ):
    """Per-key probability estimate mean_q exp(logit - log Z_q) of the clusters ``c`` (0 where not c_ok)."""
    both = q_ok[:, None] & c_ok[None, :]
    logits = tl.load(LOGITS_ROW + offs_q[:, None] * s_gq + c[None, :], mask=both, other=0.0)
    return _sum(tl.where(both, tl.exp(logits - logz[:, None]), 0.0), axis=0) / NQ


@triton.jit
def _segment_lengths(keep, SIZES_ROW, g, c, c_ok, NC, SINK, WINDOW):
    """Kept length of segments ``g`` (int32): the sinks (g = 0), kept cluster c = g - 1, the window (g = NC + 1)."""
    size = tl.load(SIZES_ROW + c, mask=c_ok, other=0).to(tl.int32)
    ln = tl.where(keep, size, 0)
    ln = tl.where(g == 0, SINK, ln)
    return tl.where(g == NC + 1, WINDOW, ln)


@triton.jit
def _decide_logits_kernel(
    LOGITS, PART, FIXED, THR, SIZES, PROBS, KEEP, SEGLEN, BLOCKSUM,
    s_gb, s_gh, s_gq, s_pb, s_ph, s_pk, s_fb, s_fh, s_sh, s_xb, s_xh, s_eb, s_eh, s_bb, s_bh,
    HK, NQ, NC, NB, SINK, WINDOW,
    HAS_FIXED: tl.constexpr, HAS_SEGLEN: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    """Program (j, b*h) owns segments g in [j * BLOCK_S, (j + 1) * BLOCK_S): g = 0 the sinks, g = NC + 1 the
    window, else fine cluster g - 1. Writes PROBS/KEEP of its clusters and, with HAS_SEGLEN, SEGLEN[g] and
    BLOCKSUM[j] = the kept keys of its segments."""
    chain_enter(PDL)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    offs_q = tl.arange(0, BLOCK_Q)
    q_ok = offs_q < NQ
    logz = _head_logz(PART + b * s_pb + h * s_ph, s_pk, NB, FIXED + b * s_fb + h * s_fh, offs_q, q_ok, HAS_FIXED,
                      BLOCK_P, BLOCK_Q)
    g = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    c = g - 1
    c_ok = (g >= 1) & (c < NC)
    p = _cluster_probs(LOGITS + b * s_gb + h * s_gh, s_gq, logz, c, c_ok, offs_q, q_ok, NQ)
    keep = c_ok & (p >= tl.load(THR + h))
    tl.store(PROBS + b * s_xb + h * s_xh + c, p, mask=c_ok)
    tl.store(KEEP + b * s_xb + h * s_xh + c, keep.to(tl.uint8), mask=c_ok)
    if HAS_SEGLEN:
        ln = _segment_lengths(keep, SIZES + h * s_sh, g, c, c_ok, NC, SINK, WINDOW)
        tl.store(SEGLEN + b * s_eb + h * s_eh + g, ln, mask=g < NC + 2)
        tl.store(BLOCKSUM + b * s_bb + h * s_bh + pid + tl.arange(0, 1), _sum(ln, axis=0) + tl.full([1], 0, tl.int32))


@triton.jit
def _decide_positions_kernel(
    LOGITS, PART, FIXED, THR, SIZES, LOWS, PROBS, KEEP, POS, TOTAL, COUNT, SCRATCH,
    s_gb, s_gh, s_gq, s_pb, s_ph, s_pk, s_fb, s_fh, s_sh, s_lb, s_lh, s_xb, s_xh, s_ob, s_oh,
    HK, ROWS, NQ, NC, NB, NBLK, SINK, WINDOW, TOKEN_BYTES, CENT_BYTES, DENSE_BYTES,
    HAS_FIXED: tl.constexpr, HAS_COUNT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_NB: tl.constexpr, PDL: tl.constexpr = 0,
):
    """Program (., b*h) takes block j of BLOCK_S segments of head (b, h) in arrival order (a ticket), decides
    its clusters as ``_decide_logits_kernel`` does, publishes its kept-key count, adds up the counts of blocks
    0 .. j - 1 (waiting for those not yet published: they hold earlier tickets, so they are running or done)
    and writes the sorted positions of its kept keys; block NBLK - 1 writes the head's total (and, with
    HAS_COUNT, the byte counts). SCRATCH (int32, zero at launch): ROWS tickets, then ROWS x NBLK published
    counts + 1 (0: not yet)."""
    chain_enter(PDL)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    j = tl.atomic_add(SCRATCH + pid_bh, 1)  # this program's block: tickets are handed out in arrival order
    flags = SCRATCH + ROWS + pid_bh * NBLK
    offs_q = tl.arange(0, BLOCK_Q)
    q_ok = offs_q < NQ
    logz = _head_logz(PART + b * s_pb + h * s_ph, s_pk, NB, FIXED + b * s_fb + h * s_fh, offs_q, q_ok, HAS_FIXED,
                      BLOCK_P, BLOCK_Q)
    g = j * BLOCK_S + tl.arange(0, BLOCK_S)
    c = g - 1
    c_ok = (g >= 1) & (c < NC)
    p = _cluster_probs(LOGITS + b * s_gb + h * s_gh, s_gq, logz, c, c_ok, offs_q, q_ok, NQ)
    keep = c_ok & (p >= tl.load(THR + h))
    tl.store(PROBS + b * s_xb + h * s_xh + c, p, mask=c_ok)
    tl.store(KEEP + b * s_xb + h * s_xh + c, keep.to(tl.uint8), mask=c_ok)
    ln = tl.where(g < NC + 2, _segment_lengths(keep, SIZES + h * s_sh, g, c, c_ok, NC, SINK, WINDOW), 0)
    kept = _sum(ln, axis=0)
    tl.atomic_xchg(flags + j, kept + 1)  # publish (the count is the whole message)
    offs_nb = tl.arange(0, BLOCK_NB)
    before = offs_nb < j
    seen = tl.load(flags + offs_nb, mask=before, other=1, volatile=True)
    while _max(tl.where(seen == 0, 1, 0), axis=0) > 0:
        seen = tl.load(flags + offs_nb, mask=before, other=1, volatile=True)
    prefix = _sum(tl.where(before, seen - 1, 0), axis=0)
    excl = _cumsum(ln, axis=0) + prefix - ln
    lo = tl.load(LOWS + b * s_lb + h * s_lh + g, mask=g < NC + 2, other=0)
    offs_k = tl.arange(0, BLOCK_K)
    p_base = POS + b * s_ob + h * s_oh
    for k0 in range(0, _max(ln, axis=0), BLOCK_K):
        kk = k0 + offs_k
        tl.store(p_base + excl[:, None] + kk[None, :], lo[:, None] + kk[None, :], mask=kk[None, :] < ln[:, None])
    if j == NBLK - 1:  # the last block: the head's total
        _finish_head(TOTAL, TOTAL, COUNT, pid_bh, prefix + kept + tl.full([1], 0, tl.int32),
                     tl.full([1], 0, tl.int64) + NC, TOKEN_BYTES, CENT_BYTES, DENSE_BYTES, False, HAS_COUNT)


def decide_from_logits(
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
    """Per-key probabilities and threshold decisions of a flat lookup from its logits (Triton; same
    arguments and results as ``reference.decide_from_logits_ref``).

    Args:
        logits: [B, Hk, Q, C] float32 per-key log-scores (``s q.c`` plus the variance term) of every cluster.
        parts: [B, Hk, P, Q] float32 partial log-normalisers whose logsumexp over P is log Z (each partial a
            logsumexp of ``logit + log n_c`` over some clusters, or of the always-attended keys).
        threshold: [Hk] per-key probability thresholds; sizes: [Hk, C] integer keys per cluster.
        fixed_logz: optional [B, Hk, Q] log-normaliser of the always-attended keys, added to log Z.
        seglen: optional [B, Hk, C + 2] int32 (contiguous), written with the kept segment lengths (sinks,
            kept cluster sizes, window); needs ``blocksum``.
        blocksum: [B, Hk, cdiv(C + 2, positions.segment_block())] int32, written with each block's kept keys
            (the ``blocksum`` argument of ``positions.kept_positions``).
    Returns:
        probs [B, Hk, C] float32, keep [B, Hk, C] bool.
    """
    b, hk, nq, c = logits.shape
    if parts.dim() != 4 or parts.shape[:2] != (b, hk) or parts.shape[3] != nq:
        raise ValueError(f"parts must be [B={b}, Hk={hk}, P, Q={nq}]; got {tuple(parts.shape)}")
    if threshold.numel() != hk or sizes.shape != (hk, c):
        raise ValueError(f"threshold must be [Hk={hk}] and sizes [Hk, C] = [{hk}, {c}]; got "
                         f"{tuple(threshold.shape)} and {tuple(sizes.shape)}")
    if fixed_logz is not None and fixed_logz.shape != (b, hk, nq):
        raise ValueError(f"fixed_logz must be [B, Hk, Q] = [{b}, {hk}, {nq}]; got {tuple(fixed_logz.shape)}")
    block = segment_block()
    nblk = triton.cdiv(c + 2, block)
    if (seglen is None) != (blocksum is None):
        raise ValueError("give seglen and blocksum together (the positions kernel reads both)")
    if seglen is not None and (seglen.shape != (b, hk, c + 2) or not seglen.is_contiguous()
                               or blocksum.shape != (b, hk, nblk) or not blocksum.is_contiguous()
                               or seglen.dtype != torch.int32 or blocksum.dtype != torch.int32):
        raise ValueError(f"seglen must be contiguous int32 [B, Hk, C + 2] = [{b}, {hk}, {c + 2}] and blocksum "
                         f"contiguous int32 [B, Hk, {nblk}]; got {seglen.dtype} {tuple(seglen.shape)} and "
                         f"{blocksum.dtype} {tuple(blocksum.shape)}")
    logits = logits.float()
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    parts = parts.float()
    parts = parts if parts.stride(-1) == 1 else parts.contiguous()
    thr = threshold.float().contiguous().view(hk)
    sizes = sizes.contiguous()
    probs = torch.empty(b, hk, c, dtype=torch.float32, device=logits.device)
    keep = torch.empty(b, hk, c, dtype=torch.uint8, device=logits.device)
    fz = fixed_logz.float().contiguous() if fixed_logz is not None else probs
    seg = seglen if seglen is not None else keep
    bsum = blocksum if blocksum is not None else keep
    _decide_logits_kernel[(nblk, b * hk)](
        logits, parts, fz, thr, sizes, probs, keep, seg, bsum,
        logits.stride(0), logits.stride(1), logits.stride(2), parts.stride(0), parts.stride(1), parts.stride(2),
        fz.stride(0), fz.stride(1), sizes.stride(0), probs.stride(0), probs.stride(1), seg.stride(0),
        seg.stride(1), bsum.stride(0), bsum.stride(1), hk, nq, c, parts.shape[2], sink, window,
        HAS_FIXED=fixed_logz is not None, HAS_SEGLEN=seglen is not None,
        BLOCK_Q=max(2, triton.next_power_of_2(nq)), BLOCK_P=min(triton.next_power_of_2(max(parts.shape[2], 1)), 64),
        BLOCK_S=block, num_warps=4, **chain_launch(logits.device),
    )
    return probs, keep.view(torch.bool)


def decide_positions_scratch(b: int, hk: int, num_clusters: int, device: torch.device) -> torch.Tensor:
    """The int32 scratch of ``decide_positions`` for B x Hk heads of C clusters (it must be zero when that
    launch starts: pass it as the lookup's ``_Level.lse(zero=)``, which zeroes it, or zero it yourself)."""
    return torch.empty(b * hk * (1 + triton.cdiv(num_clusters + 2, segment_block())), dtype=torch.int32,
                       device=device)


def decide_positions(
    logits: torch.Tensor,
    parts: torch.Tensor,
    threshold: torch.Tensor,
    sizes: torch.Tensor,
    seg_lows: torch.Tensor,
    num_tokens: int,
    scratch: torch.Tensor,
    *,
    fixed_logz: torch.Tensor | None = None,
    sink: int = 0,
    window: int = 0,
    counter: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``decide_from_logits`` and ``positions.kept_positions`` in one launch (Triton): the decisions, then the
    sorted position of every kept key, with the kept keys before each block of segments found by a
    look-back over the blocks' published counts instead of a second launch.

    Args:
        logits, parts, threshold, sizes, fixed_logz, sink, window: as ``decide_from_logits``.
        seg_lows: [Hk, C + 2] or [B or 1, Hk, C + 2] int32 first sorted position of each segment
            (``positions.segment_lows``); num_tokens: N, the bound on kept keys per head.
        scratch: ``decide_positions_scratch(B, Hk, C, device)``, all zero when this launch starts.
        counter: as ``positions.kept_positions`` (centroids scored: C per head).
    Returns:
        probs [B, Hk, C] float32, keep [B, Hk, C] bool, pos [B, Hk, N] int32 (entries past total unwritten),
        total [B, Hk] int32.
    """
    b, hk, nq, c = logits.shape
    if parts.dim() != 4 or parts.shape[:2] != (b, hk) or parts.shape[3] != nq:
        raise ValueError(f"parts must be [B={b}, Hk={hk}, P, Q={nq}]; got {tuple(parts.shape)}")
    if threshold.numel() != hk or sizes.shape != (hk, c):
        raise ValueError(f"threshold must be [Hk={hk}] and sizes [Hk, C] = [{hk}, {c}]; got "
                         f"{tuple(threshold.shape)} and {tuple(sizes.shape)}")
    if fixed_logz is not None and fixed_logz.shape != (b, hk, nq):
        raise ValueError(f"fixed_logz must be [B, Hk, Q] = [{b}, {hk}, {nq}]; got {tuple(fixed_logz.shape)}")
    lows = seg_lows if seg_lows.dim() == 3 else seg_lows.unsqueeze(0)
    if lows.shape[1:] != (hk, c + 2) or lows.shape[0] not in (1, b):
        raise ValueError(f"seg_lows must be [Hk, C + 2] or [B or 1, Hk, C + 2] with Hk={hk}, C + 2={c + 2}; got "
                         f"{tuple(seg_lows.shape)}")
    block = segment_block()
    nblk = triton.cdiv(c + 2, block)
    if scratch.dtype != torch.int32 or scratch.numel() != b * hk * (1 + nblk) or not scratch.is_contiguous():
        raise ValueError(f"scratch must be contiguous int32 of {b * hk * (1 + nblk)} entries "
                         f"(decide_positions_scratch); got {scratch.dtype} {tuple(scratch.shape)}")
    acc, token_bytes, cent_bytes, dense_bytes = counter if counter is not None else (scratch, 0, 0, 0)
    if counter is not None and (acc.dtype != torch.int64 or acc.numel() < 2):
        raise ValueError(f"counter[0] must be an int64 tensor of 2 entries; got {acc.dtype} {tuple(acc.shape)}")
    dev = logits.device
    logits = logits.float()
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    parts = parts.float()
    parts = parts if parts.stride(-1) == 1 else parts.contiguous()
    thr = threshold.float().contiguous().view(hk)
    sizes = sizes.contiguous()
    probs = torch.empty(b, hk, c, dtype=torch.float32, device=dev)
    keep = torch.empty(b, hk, c, dtype=torch.uint8, device=dev)
    pos = torch.empty(b, hk, max(num_tokens, 1), dtype=torch.int32, device=dev)
    total = torch.empty(b, hk, dtype=torch.int32, device=dev)
    fz = fixed_logz.float().contiguous() if fixed_logz is not None else probs
    _decide_positions_kernel[(nblk, b * hk)](
        logits, parts, fz, thr, sizes, lows, probs, keep, pos, total, acc, scratch,
        logits.stride(0), logits.stride(1), logits.stride(2), parts.stride(0), parts.stride(1), parts.stride(2),
        fz.stride(0), fz.stride(1), sizes.stride(0), lows.stride(0) if lows.shape[0] == b else 0, lows.stride(1),
        probs.stride(0), probs.stride(1), pos.stride(0), pos.stride(1),
        hk, b * hk, nq, c, parts.shape[2], nblk, sink, window, token_bytes, cent_bytes, dense_bytes,
        HAS_FIXED=fixed_logz is not None, HAS_COUNT=counter is not None,
        BLOCK_Q=max(2, triton.next_power_of_2(nq)), BLOCK_P=min(triton.next_power_of_2(max(parts.shape[2], 1)), 64),
        BLOCK_S=block, BLOCK_K=16 if _interpret() else POSITIONS_TUNING["block_k"],
        BLOCK_NB=max(2, triton.next_power_of_2(nblk)), num_warps=4 if _interpret() else POSITIONS_TUNING["num_warps"],
        **chain_launch(dev),
    )
    return probs, keep.view(torch.bool), pos, total
