"""Threshold decisions of a flat few-query lookup straight from its stored logits, in segment order.

A flat decode lookup (``lookup_level._Level.lse``) leaves, per (question, KV head), the partial log-normalisers
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
from .lookup_tiles import _head_logz
from .positions import segment_block
from .sparse_attention import _sum

__all__ = ["decide_from_logits"]


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
