"""Index lists and decisions of the many-query lookup (``lookup_many.many_query_lookup``), in Triton.

``compact_fine``      the fine clusters under kept coarse clusters become one dense index list per head (and
                      the ``allowed`` mask): ``_coarse_excl_kernel`` counts the fine clusters before each coarse
                      one, ``_fine_index_kernel`` places each fine cluster (binary search for its parent), so
                      the fine level's tiles are full whatever the number of fine clusters per coarse one
                      (torch twin ``compact_fine_ref``).
``threshold_decide``  threshold mode's decisions (``_decide_kernel``): keep flags and kept segment lengths in
                      one launch.
``write_seglen``      the same segment lengths from a keep mask, on the host side.

Nothing reads a device value on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chain import chain_enter, chain_launch
from .sparse_attention import _cumsum, _interpret, _sum

__all__ = ["compact_fine", "threshold_decide", "write_seglen"]


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _coarse_excl_kernel(KEEPC, COFF, EXCL, COUNT, s_kb, s_kh, s_oh, s_eb, s_eh, s_nb, s_nh, HK, NCC,
                        BLOCK_G: tl.constexpr, PDL: tl.constexpr = 0):
    """EXCL[b, h, g]: fine clusters under kept coarse clusters before g; COUNT[b, h]: all of them."""
    chain_enter(PDL)
    pid_bh = tl.program_id(0)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    carry = _sum(tl.full([1], 0, tl.int32), 0)  # a 0-d int32 loop carry
    for g0 in range(0, NCC, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        ok = g < NCC
        kept = tl.load(KEEPC + b * s_kb + h * s_kh + g, mask=ok, other=0) != 0
        lo = tl.load(COFF + h * s_oh + g, mask=ok, other=0)
        hi = tl.load(COFF + h * s_oh + g + 1, mask=ok, other=0)
        nf = tl.where(kept & ok, hi - lo, 0).to(tl.int32)
        incl = _cumsum(nf, 0)
        tl.store(EXCL + b * s_eb + h * s_eh + g, carry + incl - nf, mask=ok)
        carry += _sum(nf, 0)
    tl.store(COUNT + b * s_nb + h * s_nh, carry)


@triton.jit
def _fine_index_kernel(KEEPC, COFF, EXCL, IDX, ALLOWED, PROBS, s_kb, s_kh, s_oh, s_eb, s_eh, s_ib, s_ih,
                       s_ab, s_ah, s_pb, s_ph, HK, NC, NCC, SEARCH_STEPS: tl.constexpr, BLOCK_F: tl.constexpr,
                       PDL: tl.constexpr = 0):
    """Each fine cluster finds its coarse parent (binary search in COFF), writes ALLOWED and, under a kept
    parent, its own index at its place in IDX; PROBS is zeroed outside kept parents."""
    chain_enter(PDL)
    pid_f = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    ok = f < NC
    coff = COFF + h * s_oh
    lo = tl.full([BLOCK_F], 0, tl.int32)  # parent = number of coarse ends COFF[1 ..] <= f
    hi = tl.full([BLOCK_F], 0, tl.int32) + NCC
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        end = tl.load(coff + 1 + mid, mask=ok & (mid < NCC), other=0)
        right = (end <= f) & (mid < hi)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right, hi, mid)
    parent = tl.minimum(lo, NCC - 1)
    kept = (tl.load(KEEPC + b * s_kb + h * s_kh + parent, mask=ok, other=0) != 0) & ok
    tl.store(ALLOWED + b * s_ab + h * s_ah + f, kept.to(tl.uint8), mask=ok)
    tl.store(PROBS + b * s_pb + h * s_ph + f, tl.full([BLOCK_F], 0.0, tl.float32), mask=ok & ~kept)
    first = tl.load(coff + parent, mask=ok, other=0).to(tl.int32)
    slot = tl.load(EXCL + b * s_eb + h * s_eh + parent, mask=kept, other=0) + (f - first)
    tl.store(IDX + b * s_ib + h * s_ih + slot, f, mask=kept)


@triton.jit
def _decide_kernel(P, THR, ALLOWED, SIZES, KEEP, SEGLEN, s_pb, s_ph, s_ab, s_ah, s_sh, s_kb, s_kh, s_eb, s_eh,
                   HK, NC, SINK, WINDOW, HAS_ALLOWED: tl.constexpr, HAS_SEGLEN: tl.constexpr, BLOCK: tl.constexpr,
                   PDL: tl.constexpr = 0):
    """Threshold decisions in one launch: KEEP[b, h, c] = P[b, h, c] >= THR[h] (and ALLOWED) as uint8 and, with
    HAS_SEGLEN, the kept segment lengths SEGLEN[b, h, :] = (SINK, kept size of each cluster, WINDOW)."""
    chain_enter(PDL)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    c = pid * BLOCK + tl.arange(0, BLOCK)
    ok = c < NC
    p = tl.load(P + b * s_pb + h * s_ph + c, mask=ok, other=0.0)
    keep = ok & (p >= tl.load(THR + h))
    if HAS_ALLOWED:
        keep = keep & (tl.load(ALLOWED + b * s_ab + h * s_ah + c, mask=ok, other=0) != 0)
    tl.store(KEEP + b * s_kb + h * s_kh + c, keep.to(tl.uint8), mask=ok)
    if HAS_SEGLEN:
        e_base = SEGLEN + b * s_eb + h * s_eh
        size = tl.load(SIZES + h * s_sh + c, mask=ok, other=0)
        tl.store(e_base + 1 + c, tl.where(keep, size, 0).to(tl.int32), mask=ok)
        if pid == 0:
            tl.store(e_base + tl.arange(0, 1), tl.full([1], 0, tl.int32) + SINK)
            tl.store(e_base + NC + 1 + tl.arange(0, 1), tl.full([1], 0, tl.int32) + WINDOW)


# ----------------------------------------------------------------------------------------------- host side


def compact_fine(keep_c: torch.Tensor, coarse_offsets: torch.Tensor, num_fine: int, probs: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fine clusters under kept coarse clusters as one sorted list per head (``compact_fine_ref``).

    keep_c [B, Hk, Cc] bool/uint8, coarse_offsets [Hk, Cc + 1] int64. Returns idx [B, Hk, Cf] int32 (the first
    count[b, h] entries hold the fine indices in increasing order, the rest is undefined), count [B, Hk] int32
    and allowed [B, Hk, Cf] uint8. ``probs`` [B, Hk, Cf] float32, if given, is set to 0 outside kept parents."""
    b, hk, ncc = keep_c.shape
    dev = keep_c.device
    keep_c = keep_c.view(torch.uint8) if keep_c.dtype == torch.bool else keep_c
    idx = torch.empty(b, hk, num_fine, dtype=torch.int32, device=dev)
    allowed = torch.empty(b, hk, num_fine, dtype=torch.uint8, device=dev)
    count = torch.empty(b, hk, dtype=torch.int32, device=dev)
    excl = torch.empty(b, hk, ncc, dtype=torch.int32, device=dev)
    pr = probs if probs is not None else torch.empty(b, hk, num_fine, dtype=torch.float32, device=dev)
    _coarse_excl_kernel[(b * hk,)](
        keep_c, coarse_offsets, excl, count, keep_c.stride(0), keep_c.stride(1), coarse_offsets.stride(0),
        excl.stride(0), excl.stride(1), count.stride(0), count.stride(1), hk, ncc,
        BLOCK_G=min(1024, triton.next_power_of_2(max(ncc, 2))), num_warps=4,
        **chain_launch(keep_c.device),
    )
    block_f = 256 if not _interpret() else 64
    _fine_index_kernel[(triton.cdiv(max(num_fine, 1), block_f), b * hk)](
        keep_c, coarse_offsets, excl, idx, allowed, pr, keep_c.stride(0), keep_c.stride(1),
        coarse_offsets.stride(0), excl.stride(0), excl.stride(1), idx.stride(0), idx.stride(1), allowed.stride(0),
        allowed.stride(1), pr.stride(0), pr.stride(1), hk, num_fine, ncc,
        SEARCH_STEPS=max(1, int(ncc).bit_length()), BLOCK_F=block_f, num_warps=4,
        **chain_launch(keep_c.device),
    )
    return idx, count, allowed


def threshold_decide(probs: torch.Tensor, threshold: torch.Tensor, sizes: torch.Tensor | None = None,
                     allowed: torch.Tensor | None = None, seglen: torch.Tensor | None = None, sink: int = 0,
                     window: int = 0) -> torch.Tensor:
    """keep [B, Hk, C] bool = probs [B, Hk, C] >= threshold [Hk] (and ``allowed`` [B, Hk, C] uint8) in one
    launch; with ``seglen`` [B, Hk, C + 2] int32 (needs ``sizes`` [Hk, C]) it also writes the kept segment
    lengths (sink, kept cluster sizes, window), as ``write_seglen`` does."""
    b, hk, c = probs.shape
    if threshold.numel() != hk:
        raise ValueError(f"threshold must hold one value per KV head ({hk}); got shape {tuple(threshold.shape)}")
    if seglen is not None and (sizes is None or seglen.shape != (b, hk, c + 2) or sizes.shape != (hk, c)):
        raise ValueError(f"seglen must be [B, Hk, C + 2] = [{b}, {hk}, {c + 2}] and needs sizes [Hk, C] = "
                         f"[{hk}, {c}]; got {None if seglen is None else tuple(seglen.shape)} and sizes "
                         f"{None if sizes is None else tuple(sizes.shape)}")
    if allowed is not None and allowed.shape != probs.shape:
        raise ValueError(f"allowed must have probs' shape {tuple(probs.shape)}; got {tuple(allowed.shape)}")
    probs = probs.float().contiguous()  # (the kernel assumes unit last strides)
    allowed = allowed.to(torch.uint8).contiguous() if allowed is not None else None
    sizes = sizes.contiguous() if sizes is not None else None
    if seglen is not None and not seglen.is_contiguous():
        raise ValueError("seglen must be contiguous (it is written in place)")
    thr = threshold.float().contiguous().view(hk)
    keep = torch.empty(b, hk, c, dtype=torch.uint8, device=probs.device)
    alw = allowed if allowed is not None else keep
    seg = seglen if seglen is not None else probs
    sz = sizes if sizes is not None else thr
    block = 256 if _interpret() else 1024
    _decide_kernel[(triton.cdiv(max(c, 1), block), b * hk)](
        probs, thr, alw, sz, keep, seg, probs.stride(0), probs.stride(1), alw.stride(0), alw.stride(1),
        sz.stride(0), keep.stride(0), keep.stride(1), seg.stride(0), seg.stride(1), hk, c, sink, window,
        HAS_ALLOWED=allowed is not None, HAS_SEGLEN=seglen is not None, BLOCK=block, num_warps=4,
        **chain_launch(probs.device),
    )
    return keep.view(torch.bool)


def write_seglen(seglen: torch.Tensor, keep: torch.Tensor, fine_sizes: torch.Tensor, sink: int, window: int) -> None:
    """Kept segment lengths [B, Hk, Cf + 2] (sinks, kept fine cluster sizes, window) from a keep mask, for
    threshold decisions taken on the host side."""
    seglen[..., 1:-1] = torch.where(keep, fine_sizes.unsqueeze(0), 0)
    seglen[..., 0], seglen[..., -1] = sink, window
