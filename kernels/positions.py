"""Kept segments -> the sorted position of every kept key, the input of the sparse attention kernel.

``kept_positions`` (lookup path): per (batch, KV head) the kept length of every segment (sinks, fine clusters,
observation window, in sorted order) becomes ``pos[b, h, i]``, the sorted position of kept key ``i``, plus the
kept count; it can also count the bytes read for the KV budget. ``expand_positions`` (ranges path): the same
from the inclusive cumulative lengths of explicit [start, end) ranges. ``segment_lows``: the first sorted
position of each segment, fixed per layer. Nothing here reads a device value on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chain import chain_enter, chain_launch
from .sparse_attention import _cumsum, _interpret, _max, _sum

__all__ = ["segment_lows", "kept_positions", "expand_positions", "segment_block"]


# Launch settings of the positions kernel on a GPU: segments per program (also the block of
# ``decide.decide_from_logits``), key columns per store step, warps. benchmarks/gpu_positions_sweep.py on an
# H100 at 128K (docs/bench/session8/positions_sweep.txt), against 256 / 16 / 4: threshold decisions +
# positions 17.0 -> 15.3 us (Llama-2-7B) and 12.5 -> 12.0 us (Llama-3-8B); budget positions 11.2 -> 9.3 us
# and 7.2 -> 7.2 us.
TUNING = {"block_s": 128, "block_k": 8, "num_warps": 4}


def segment_block() -> int:
    """Segments per program of the positions kernel (and of ``decide.decide_from_logits``, whose per-block
    kept sums the positions kernel reads)."""
    return 64 if _interpret() else TUNING["block_s"]


@triton.jit
def _count_le(ptr, n, x, LOG_N: tl.constexpr):
    """For each element of ``x``: how many of the sorted ``ptr[0:n]`` are <= it (searchsorted, right)."""
    lo = (x * 0)
    hi = (x * 0) + n
    for _ in tl.static_range(LOG_N):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(ptr + mid, mask=active, other=0)
        go = active & (v <= x)
        lo = tl.where(go, mid + 1, lo)
        hi = tl.where(active & (v > x), mid, hi)
    return lo


@triton.jit
def _expand_kernel(
    CUM, LO, POS,
    s_cb, s_ch, s_lb, s_lh, s_pb, s_ph,
    HK, R,
    LOG_R: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    """pos[b, h, i] = lo[r] + i - cum[r - 1] for kept key i of range r (cum = inclusive cumsum of lengths)."""
    chain_enter(PDL)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    cum_row = CUM + b * s_cb + h * s_ch
    total = tl.load(cum_row + R - 1)
    if pid * BLOCK < total:
        slots = pid * BLOCK + tl.arange(0, BLOCK)
        valid = slots < total
        r = _count_le(cum_row, R, slots, LOG_R)  # range holding each slot
        before = tl.load(cum_row + r - 1, mask=valid & (r > 0), other=0)
        lo = tl.load(LO + b * s_lb + h * s_lh + r, mask=valid, other=0)
        pos = lo + slots - before
        tl.store(POS + b * s_pb + h * s_ph + slots, pos.to(tl.int32), mask=valid)


@triton.jit
def _positions_kernel(
    SEGLEN, LOWS, POS, TOTAL, ALLOWED, READ, COUNT, EXCL, BLOCKSUM,
    s_eb, s_eh, s_lb, s_lh, s_pb, s_ph, s_ab, s_ah, s_xb, s_xh, s_bb, s_bh,
    HK, R, NA, NCC, TOKEN_BYTES, CENT_BYTES, DENSE_BYTES,
    HAS_ALLOWED: tl.constexpr, HAS_COUNT: tl.constexpr, HAS_EXCL: tl.constexpr, HAS_BLOCKSUM: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_NB: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    """Segment lengths -> pos[b, h, i] = sorted position of kept key i (segments in order), TOTAL[b, h] and
    READ[b, h] = the centroids scored: NCC, plus the allowed fine clusters with HAS_ALLOWED. Program (s, b*h)
    owns BLOCK_S segments and sums the lengths before them itself (no second pass), or with HAS_EXCL reads
    their exclusive prefix sums from EXCL (written by the budget search), or with HAS_BLOCKSUM sums the kept
    keys of the blocks before it from BLOCKSUM (one entry per BLOCK_S segments, written by
    ``decide.decide_from_logits``). With HAS_COUNT, the last block of each (b, h) adds TOTAL * TOKEN_BYTES +
    READ * CENT_BYTES to COUNT[0] and DENSE_BYTES to COUNT[1] (int64 atomics: exact and order-free)."""
    chain_enter(PDL)
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    e_base = SEGLEN + b * s_eb + h * s_eh
    start = pid_s * BLOCK_S
    offs_p = tl.arange(0, BLOCK_P)
    offs = start + tl.arange(0, BLOCK_S)
    ok = offs < R
    ln = tl.load(e_base + offs, mask=ok, other=0)
    if HAS_EXCL:
        excl = tl.load(EXCL + b * s_xb + h * s_xh + offs, mask=ok, other=0)
    elif HAS_BLOCKSUM:
        offs_nb = tl.arange(0, BLOCK_NB)
        before = tl.load(BLOCKSUM + b * s_bb + h * s_bh + offs_nb, mask=offs_nb < pid_s, other=0)
        excl = _cumsum(ln, axis=0) + _sum(before, axis=0) - ln
    else:
        prefix = _sum(tl.full([BLOCK_P], 0, tl.int32), axis=0)
        for k0 in range(0, start, BLOCK_P):  # keys kept before this block of segments
            kk = k0 + offs_p
            prefix += _sum(tl.load(e_base + kk, mask=kk < start, other=0), axis=0)
        excl = _cumsum(ln, axis=0) + prefix - ln
    lo = tl.load(LOWS + b * s_lb + h * s_lh + offs, mask=ok, other=0)
    offs_k = tl.arange(0, BLOCK_K)
    p_base = POS + b * s_pb + h * s_ph
    for k0 in range(0, _max(ln, axis=0), BLOCK_K):
        kk = k0 + offs_k
        tl.store(p_base + excl[:, None] + kk[None, :], lo[:, None] + kk[None, :], mask=kk[None, :] < ln[:, None])
    if start + BLOCK_S >= R:  # last block
        kept = _max(tl.where(ok, excl + ln, 0), axis=0) + tl.full([1], 0, tl.int32)  # the last segment's end
        cents = tl.full([1], 0, tl.int64) + NCC
        if HAS_ALLOWED:
            n = _sum(tl.full([BLOCK_P], 0, tl.int32), axis=0)
            for k0 in range(0, NA, BLOCK_P):
                kk = k0 + offs_p
                n += _sum(tl.load(ALLOWED + b * s_ab + h * s_ah + kk, mask=kk < NA, other=0).to(tl.int32), axis=0)
            cents += n.to(tl.int64)
        _finish_head(TOTAL, READ, COUNT, pid_bh, kept, cents, TOKEN_BYTES, CENT_BYTES, DENSE_BYTES, HAS_COUNT)


@triton.jit
def _finish_head(TOTAL, READ, COUNT, pid_bh, kept, cents, TOKEN_BYTES, CENT_BYTES, DENSE_BYTES,
                 HAS_COUNT: tl.constexpr):
    """Per (b, h) after its positions: TOTAL = kept keys [1] int32; READ = centroids scored [1] int64 (the
    flat lookup's constant too: a fill launch of its own would sit between this kernel and the attention
    and break the launch overlap); with HAS_COUNT, COUNT[0] += kept * TOKEN_BYTES + cents * CENT_BYTES and
    COUNT[1] += DENSE_BYTES (int64 atomics: exact and order-free)."""
    tl.store(TOTAL + pid_bh + tl.arange(0, 1), kept)
    tl.store(READ + pid_bh + tl.arange(0, 1), cents)
    if HAS_COUNT:
        tl.atomic_add(COUNT + tl.arange(0, 1), kept.to(tl.int64) * TOKEN_BYTES + cents * CENT_BYTES)
        tl.atomic_add(COUNT + 1 + tl.arange(0, 1), tl.full([1], 0, tl.int64) + DENSE_BYTES)


# ----------------------------------------------------------------------------------------------- host side


def expand_positions(cum: torch.Tensor, lows: torch.Tensor, max_keys: int) -> torch.Tensor:
    """Sorted position of every kept key, in range order.

    Args:
        cum: [B, Hk, R] int32 inclusive cumulative lengths of the ranges (last entry = kept keys of the head).
        lows: [B or 1, Hk, R] integer start position of each range.
        max_keys: upper bound of kept keys per head (N).
    Returns:
        pos: [B, Hk, max_keys] int32; entries past the head's kept count are left unwritten.
    """
    b, hk, r = cum.shape
    pos = torch.empty(b, hk, max(max_keys, 1), dtype=torch.int32, device=cum.device)
    block = 256 if _interpret() else 1024
    grid = (triton.cdiv(max(max_keys, 1), block), b * hk)
    s_lb = lows.stride(0) if lows.shape[0] == b else 0
    _expand_kernel[grid](
        cum, lows, pos,
        cum.stride(0), cum.stride(1), s_lb, lows.stride(1), pos.stride(0), pos.stride(1),
        hk, r, LOG_R=max(r.bit_length(), 1) + 1, BLOCK=block, num_warps=4, **chain_launch(cum.device),
    )
    return pos


def segment_lows(fine_offsets: torch.Tensor, num_tokens: int, window_tokens: int) -> torch.Tensor:
    """[Hk, Cf + 1] fine offsets -> [Hk, Cf + 2] int32 first sorted position of each segment
    (sinks, fine clusters, observation window). Depends only on the layer: compute it once."""
    hk = fine_offsets.shape[0]
    first = torch.zeros(hk, 1, dtype=torch.int32, device=fine_offsets.device)
    last = torch.full((hk, 1), num_tokens - window_tokens, dtype=torch.int32, device=fine_offsets.device)
    return torch.cat([first, fine_offsets[:, :-1].to(torch.int32), last], dim=1).contiguous()


def kept_positions(seglen: torch.Tensor, seg_lows: torch.Tensor, num_tokens: int, allowed: torch.Tensor | None = None,
                   num_coarse: int = 0, counter: tuple | None = None, excl: torch.Tensor | None = None,
                   blocksum: torch.Tensor | None = None):
    """Kept segment lengths -> sorted position of every kept key, without a host sync.

    Args:
        seglen: [B, Hk, R] int32 kept length of every segment (0 for dropped ones), in sorted order.
        seg_lows: [Hk, R] or [B or 1, Hk, R] int32 first sorted position of each segment (``segment_lows``).
        num_tokens: N, the bound on kept keys per head.
        allowed: optional [B, Hk, Cf] uint8 fine clusters scored by the lookup, to count centroids read.
        num_coarse: centroids scored per head besides the allowed fine ones (all of them without ``allowed``).
        counter: optional ``(acc, token_bytes, centroid_bytes, dense_bytes)``: add, for every (b, h), the
            bytes read (kept keys * token_bytes + centroids scored * centroid_bytes) to ``acc[0]`` and
            ``dense_bytes`` to ``acc[1]`` (acc: int64 [2] on the device; the KV-budget accumulator).
        excl: optional [B, Hk, R] int32 exclusive prefix sums of ``seglen`` (``budget.budget_mask(excl=)``
            writes them), so the kernel need not sum the lengths before each block.
        blocksum: optional [B, Hk, cdiv(R, segment_block())] int32 kept keys of each block of
            ``segment_block()`` segments (``decide.decide_from_logits`` writes them); same purpose as ``excl``.
    Returns:
        pos [B, Hk, N] int32 (entries past total unwritten), total [B, Hk] int32 kept keys per head, and
        read [B, Hk] int64 = num_coarse + allowed fine clusters (num_coarse without ``allowed``).
    """
    b, hk, r = seglen.shape
    lows = seg_lows if seg_lows.dim() == 3 else seg_lows.unsqueeze(0)
    dev = seglen.device
    pos = torch.empty(b, hk, max(num_tokens, 1), dtype=torch.int32, device=dev)
    total = torch.empty(b, hk, dtype=torch.int32, device=dev)
    read = torch.empty(b, hk, dtype=torch.int64, device=dev)
    alw = allowed if allowed is not None else seglen
    acc, token_bytes, cent_bytes, dense_bytes = counter if counter is not None else (total, 0, 0, 0)
    if counter is not None and (acc.dtype != torch.int64 or acc.numel() < 2):
        raise ValueError(f"counter[0] must be an int64 tensor of 2 entries; got {acc.dtype} {tuple(acc.shape)}")
    if excl is not None and excl.shape != seglen.shape:
        raise ValueError(f"excl must have seglen's shape {tuple(seglen.shape)}; got {tuple(excl.shape)}")
    block_s = segment_block()
    nblk = triton.cdiv(r, block_s)
    if blocksum is not None and (blocksum.shape != (b, hk, nblk) or blocksum.stride(-1) != 1
                                 or blocksum.dtype != torch.int32):
        raise ValueError(f"blocksum must be int32 [B, Hk, cdiv(R, {block_s})] = [{b}, {hk}, {nblk}] with a "
                         f"contiguous last dim; got {blocksum.dtype} {tuple(blocksum.shape)}")
    exc = excl if excl is not None else seglen
    bsum = blocksum if blocksum is not None else seglen
    _positions_kernel[(nblk, b * hk)](
        seglen, lows, pos, total, alw, read, acc, exc, bsum,
        seglen.stride(0), seglen.stride(1), lows.stride(0) if lows.shape[0] == b else 0, lows.stride(1),
        pos.stride(0), pos.stride(1), alw.stride(0), alw.stride(1), exc.stride(0), exc.stride(1),
        bsum.stride(0), bsum.stride(1), hk, r, alw.shape[-1], num_coarse, token_bytes, cent_bytes, dense_bytes,
        HAS_ALLOWED=allowed is not None, HAS_COUNT=counter is not None, HAS_EXCL=excl is not None,
        HAS_BLOCKSUM=blocksum is not None and excl is None, BLOCK_S=block_s,
        BLOCK_P=min(triton.next_power_of_2(r), 8192), BLOCK_K=16 if _interpret() else TUNING["block_k"],
        BLOCK_NB=max(2, triton.next_power_of_2(nblk)), num_warps=4 if _interpret() else TUNING["num_warps"],
        **chain_launch(seglen.device),
    )
    return pos, total, read
