"""A flat threshold decode lookup in one launch: scores, decisions and kept positions (GPU only).

The three-launch path of a flat few-query threshold lookup (``lookup_kernels._lse_kernel`` ->
``decide.decide_from_logits`` -> ``positions.kept_positions``) is three short kernels whose launch, ramp and
tail cost more than their memory traffic at decode sizes. Here one cooperative launch does all three,
``P`` programs per (question, KV head), each owning a contiguous run of fine clusters, in three phases
separated by per-head grid barriers (an atomic arrival counter; all programs are co-resident, which the
cooperative launch guarantees or refuses):

1. scores: the logits of the program's clusters for every grouped query (kept in a scratch buffer) and
   their partial log-normaliser (program 0 adds the always-attended keys' exact term);
2. decisions: log Z from the P partials, the per-key probability, ``>= threshold``, the kept segment
   lengths (program 0 also owns the sinks' segment, the last program the window's) and the program's kept
   sum;
3. positions: the kept keys before the program (the sums of programs before it), then the sorted position
   of every kept key of its segments; the last program writes the head's total.

The counters return to zero at the end of every launch (the last program to leave resets them), so one
cached buffer serves every launch on a stream; two of these lookups must not run at the same time on
different streams with the same buffer (``_counters`` keys it by stream). The Triton interpreter runs
programs one after another, so barriers cannot work there: CPU runs take the three-launch path, whose
kernels have the same contract (``reference.centroid_lookup_ref`` plus ``ranges_from_mask_ref``), and the
GPU tests check this kernel against it bit for bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chain import chain_enter, chain_launch
from .lookup_kernels import (_add_spread, _always_state, _finish_lse, _load_cent, _load_q, _logaddexp, _online,
                             _qnorm2, _scores)
from .sparse_attention import _cumsum, _max, _sum

__all__ = ["fused_decode_lookup", "fused_decode_supported"]

# Launch settings: programs per SM in all (the grid must stay co-resident), clusters per tile, warps,
# pipeline stages of the centroid loads, segments per decision/positions step, key columns per store step.
# ``enabled``: use this path where it applies (environment SQATTN_FUSED_LOOKUP=0: the three-launch path).
TUNING = {"programs_per_sm": 1, "block_c": 64, "num_warps": 4, "num_stages": 2, "block_s": 128, "block_k": 8,
          "poll": 0, "enabled": os.environ.get("SQATTN_FUSED_LOOKUP", "1") != "0"}


@triton.jit
def _nap(x):
    """x, after the thread sleeps about 100 ns (``nanosleep``; spares the memory system while polling)."""
    return tl.inline_asm_elementwise("nanosleep.u32 100; mov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _head_barrier(CNT, target, POLL: tl.constexpr):
    """Wait until CNT (this head's arrival counter) reaches ``target``, after adding this program's arrival.
    The block barrier before the release makes every thread's earlier stores part of it. POLL 0: poll with
    acquiring atomics; 1: with volatile loads, then one acquiring atomic; 2: as 1 with a short sleep per poll."""
    tl.debug_barrier()
    tl.atomic_add(CNT, 1, sem="release", scope="gpu")
    if POLL == 0:
        seen = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
    else:
        seen = tl.load(CNT, volatile=True)
        while seen < target:
            if POLL == 2:
                seen = _nap(seen)
            seen = tl.load(CNT, volatile=True)
        tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _fused_decode_lookup_kernel(
    Q, C, SIZES, SPREAD, K, FIXED, THR, LOWS, LOGITS, PART, SEGLEN, BSUM, KEEP, POS, TOTAL, COUNT, CNT,
    s_qb, s_qh, s_qm, s_ch, s_cc, s_sh, s_vh, s_kh, s_kn, s_fb, s_fh, s_lh, s_gb, s_gh, s_gq,
    s_pb, s_ph, s_eb, s_eh, s_bb, s_bh, s_xb, s_xh, s_ob, s_oh,
    HK, ROWS, NQ, NC, N, SINK, WINDOW, SEG_SINK, SEG_WINDOW, P, PER_PROG, scale, half_s2, TOKEN_BYTES, CENT_BYTES,
    DENSE_BYTES,
    HAS_SPREAD: tl.constexpr, ALWAYS: tl.constexpr, HAS_FIXED: tl.constexpr, HAS_COUNT: tl.constexpr,
    ROWWISE: tl.constexpr, NATIVE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, POLL: tl.constexpr, PDL: tl.constexpr = 0,
):
    """Program (j, b*h): fine clusters [j * PER_PROG, (j + 1) * PER_PROG) of head h of question b."""
    chain_enter(PDL)
    j = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    c_lo = j * PER_PROG
    c_hi = tl.minimum(c_lo + PER_PROG, NC)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_q = tl.arange(0, BLOCK_Q)
    q_ok = offs_q < NQ
    offs_cb = tl.arange(0, BLOCK_C)
    c_h, sizes_h, spread_h = C + h * s_ch, SIZES + h * s_sh, SPREAD + h * s_vh
    logits_bh = LOGITS + b * s_gb + h * s_gh
    cnt = CNT + pid_bh

    # ---- phase 1: logits of this program's clusters and their partial log-normaliser
    qv = _load_q(Q + b * s_qb + h * s_qh, s_qm, 0, NQ, offs_d, d_ok, BLOCK_Q, NATIVE)
    qn2 = _qnorm2(qv)
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    s = tl.full([BLOCK_Q], 0.0, tl.float32)
    if ALWAYS:
        if j == 0:  # the always-attended keys' exact term joins program 0's partial
            m, s = _always_state(qv, K + h * s_kh, s_kn, N, SINK, WINDOW, scale, offs_d, d_ok, BLOCK_Q, BLOCK_C,
                                 ROWWISE, NATIVE, "ieee")
    for c0 in tl.range(c_lo, c_hi, BLOCK_C, num_stages=NUM_STAGES):
        offs_c = c0 + offs_cb
        sel = offs_c < c_hi
        cent = _load_cent(c_h, s_cc, offs_c, sel, offs_d, d_ok, NATIVE)
        logn = tl.log(tl.load(sizes_h + offs_c, mask=sel, other=1).to(tl.float32))
        logits = _scores(qv, cent, scale, BLOCK_Q, BLOCK_C, ROWWISE, NATIVE, "ieee")
        logits = _add_spread(logits, spread_h, offs_c, sel, qn2, half_s2, HAS_SPREAD)
        tl.store(logits_bh + offs_q[:, None] * s_gq + offs_c[None, :], logits, mask=q_ok[:, None] & sel[None, :])
        m, s = _online(m, s, tl.where(sel[None, :], logits + logn[None, :], float("-inf")))
    part_bh = PART + b * s_pb + h * s_ph
    tl.store(part_bh + offs_q * P + j, _finish_lse(m, s), mask=q_ok)  # PART[b, h, q, j]
    _head_barrier(cnt, P, POLL)

    # ---- phase 2: log Z, decisions and kept segment lengths of this program's segments
    offs_p = tl.arange(0, BLOCK_P)
    pv = tl.load(part_bh + offs_q[:, None] * P + offs_p[None, :], mask=q_ok[:, None] & (offs_p < P)[None, :],
                 other=float("-inf"), cache_modifier=".cg")
    pm = _max(pv, axis=1)
    pm_safe = tl.where(pm == float("-inf"), 0.0, pm)
    logz = pm_safe + tl.log(_sum(tl.exp(pv - pm_safe[:, None]), axis=1))
    if HAS_FIXED:
        logz = _logaddexp(logz, tl.load(FIXED + b * s_fb + h * s_fh + offs_q, mask=q_ok, other=float("-inf")))
    logz = tl.where(q_ok, logz, 0.0)
    thr = tl.load(THR + h)
    g_lo = tl.where(j == 0, 0, c_lo + 1)  # segment g: 0 the sinks, c + 1 fine cluster c, NC + 1 the window
    g_hi = tl.where(j == P - 1, NC + 2, c_hi + 1)
    seg_bh = SEGLEN + b * s_eb + h * s_eh
    offs_sb = tl.arange(0, BLOCK_S)
    kept = _sum(tl.zeros([BLOCK_S], tl.int32), axis=0)
    for g0 in range(g_lo, g_hi, BLOCK_S):
        g = g0 + offs_sb
        g_ok = g < g_hi
        c = g - 1
        c_ok = g_ok & (g >= 1) & (c < NC)
        both = q_ok[:, None] & c_ok[None, :]
        lg = tl.load(logits_bh + offs_q[:, None] * s_gq + c[None, :], mask=both, other=0.0)
        p = _sum(tl.where(both, tl.exp(lg - logz[:, None]), 0.0), axis=0) / NQ
        keep = c_ok & (p >= thr)
        tl.store(KEEP + b * s_xb + h * s_xh + c, keep.to(tl.uint8), mask=c_ok)
        ln = tl.where(keep, tl.load(sizes_h + c, mask=c_ok, other=0).to(tl.int32), 0)
        ln = tl.where(g == 0, SEG_SINK, ln)
        ln = tl.where(g == NC + 1, SEG_WINDOW, ln)
        ln = tl.where(g_ok, ln, 0)
        tl.store(seg_bh + g, ln, mask=g_ok)
        kept += _sum(ln, axis=0)
    tl.store(BSUM + b * s_bb + h * s_bh + j, kept)
    _head_barrier(cnt, 2 * P, POLL)

    # ---- phase 3: sorted positions of the kept keys of this program's segments
    bs = tl.load(BSUM + b * s_bb + h * s_bh + offs_p, mask=offs_p < j, other=0, cache_modifier=".cg")
    prefix = _sum(bs, axis=0)
    lows_h = LOWS + h * s_lh
    pos_bh = POS + b * s_ob + h * s_oh
    offs_k = tl.arange(0, BLOCK_K)
    for g0 in range(g_lo, g_hi, BLOCK_S):
        g = g0 + offs_sb
        g_ok = g < g_hi
        ln = tl.load(seg_bh + g, mask=g_ok, other=0)
        excl = _cumsum(ln, axis=0) + prefix - ln
        lo = tl.load(lows_h + g, mask=g_ok, other=0)
        for k0 in range(0, _max(ln, axis=0), BLOCK_K):
            kk = k0 + offs_k
            tl.store(pos_bh + excl[:, None] + kk[None, :], lo[:, None] + kk[None, :], mask=kk[None, :] < ln[:, None])
        prefix += _sum(ln, axis=0)
    if j == P - 1:  # prefix is now the head's kept total
        tl.store(TOTAL + pid_bh + tl.arange(0, 1), prefix + tl.zeros([1], tl.int32))
        if HAS_COUNT:
            tl.atomic_add(COUNT + tl.arange(0, 1), prefix.to(tl.int64) * TOKEN_BYTES + NC * CENT_BYTES
                          + tl.zeros([1], tl.int64))
            tl.atomic_add(COUNT + 1 + tl.arange(0, 1), tl.full([1], 0, tl.int64) + DENSE_BYTES)

    # ---- leave: the last program out resets both counters for the next launch
    tl.debug_barrier()
    left = tl.atomic_add(cnt + ROWS, 1, sem="acq_rel", scope="gpu")  # exit counters follow the arrival ones
    if left == P - 1:
        tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(cnt + ROWS, 0, sem="relaxed", scope="gpu")


_COUNTERS: dict = {}


def _counters(device: torch.device, rows: int) -> torch.Tensor:
    """Zeroed int32 [2 * rows] arrival and exit counters for a launch on the current stream: cached per
    (device, stream) (the kernel leaves them zeroed), fresh during a CUDA-graph capture that finds none
    large enough (the capture owns that buffer)."""
    stream = torch.cuda.current_stream(device)
    key = (device.index, stream.cuda_stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < 2 * rows:
        buf = torch.zeros(2 * max(rows, 64), dtype=torch.int32, device=device)
        if not torch.cuda.is_current_stream_capturing():
            _COUNTERS[key] = buf
    return buf[: 2 * rows]


def fused_decode_supported(q: torch.Tensor, fine_centroids: torch.Tensor) -> bool:
    """Whether ``fused_decode_lookup`` can run: a CUDA device, Triton compiled (not interpreted), at most 16
    grouped queries."""
    return (TUNING["enabled"] and q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and q.shape[2] <= 16 and fine_centroids.shape[1] >= 1)


def _programs_per_head(device: torch.device, heads: int, nc: int, block_c: int) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per = max(1, (TUNING["programs_per_sm"] * sms) // max(heads, 1))
    return max(1, min(per, triton.cdiv(nc, block_c), 1024))


def fused_decode_lookup(q, fine_centroids, fine_sizes, fine_threshold, scale, seg_lows, num_tokens, sink, window,
                        *, fine_spread=None, fixed_logz=None, always_keys=None, counter=None):
    """Flat threshold lookup of few grouped queries with the kept positions, in one launch.

    Args: as ``lookup.centroid_lookup_positions`` (flat, threshold mode): q [B, Hk, Q <= 16, D];
        fine_centroids [Hk, C, D]; fine_sizes [Hk, C]; fine_threshold [Hk]; seg_lows [Hk, C + 2] int32;
        always_keys (keys [Hk, N, D], sink, window) with the centroids' dtype, or fixed_logz [B, Hk, Q].
    Returns:
        keep [B, Hk, C] bool, pos [B, Hk, N] int32 (entries past total unwritten), total [B, Hk] int32.
    """
    b, hk, nq, d = q.shape
    nc = fine_centroids.shape[1]
    dev = q.device
    q = q if q.stride(-1) == 1 else q.contiguous()
    cent = fine_centroids if fine_centroids.stride(-1) == 1 else fine_centroids.contiguous()
    sixteen = q.dtype == cent.dtype and q.dtype in (torch.bfloat16, torch.float16)
    rowwise = not (sixteen and nq >= 2)
    native = not rowwise
    block_q = max(2, triton.next_power_of_2(nq)) if rowwise else 16
    block_c = TUNING["block_c"]
    p = _programs_per_head(dev, b * hk, nc, block_c)
    per = triton.cdiv(triton.cdiv(nc, p), block_c) * block_c
    p = triton.cdiv(nc, per)  # every program owns at least one cluster
    sizes = fine_sizes.contiguous()
    spread = fine_spread.float().contiguous() if fine_spread is not None else sizes
    keys, ksink, kwindow = always_keys if always_keys is not None else (cent, 0, 0)
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    n_keys = keys.shape[1]
    ksink = min(ksink, n_keys)
    kwindow = min(kwindow, n_keys - ksink)
    fz = fixed_logz.float().contiguous() if fixed_logz is not None else q
    thr = fine_threshold.float().contiguous().view(hk)
    lows = seg_lows if seg_lows.dim() == 2 else seg_lows[0]
    logits = torch.empty(b, hk, nq, nc, dtype=torch.float32, device=dev)
    part = torch.empty(b, hk, nq, p, dtype=torch.float32, device=dev)
    seglen = torch.empty(b, hk, nc + 2, dtype=torch.int32, device=dev)
    bsum = torch.empty(b, hk, p, dtype=torch.int32, device=dev)
    keep = torch.empty(b, hk, nc, dtype=torch.uint8, device=dev)
    pos = torch.empty(b, hk, max(num_tokens, 1), dtype=torch.int32, device=dev)
    total = torch.empty(b, hk, dtype=torch.int32, device=dev)
    acc, token_bytes, cent_bytes, dense_bytes = counter if counter is not None else (total, 0, 0, 0)
    cnt = _counters(dev, b * hk)
    _fused_decode_lookup_kernel[(p, b * hk)](
        q, cent, sizes, spread, keys, fz, thr, lows, logits, part, seglen, bsum, keep, pos, total, acc, cnt,
        q.stride(0), q.stride(1), q.stride(2), cent.stride(0), cent.stride(1), sizes.stride(0), spread.stride(0),
        keys.stride(0), keys.stride(1), fz.stride(0), fz.stride(1), lows.stride(0), logits.stride(0),
        logits.stride(1), logits.stride(2), part.stride(0), part.stride(1), seglen.stride(0), seglen.stride(1),
        bsum.stride(0), bsum.stride(1), keep.stride(0), keep.stride(1), pos.stride(0), pos.stride(1),
        hk, b * hk, nq, nc, n_keys, ksink, kwindow, sink, window, p, per, scale, 0.5 * scale * scale, token_bytes,
        cent_bytes, dense_bytes,
        HAS_SPREAD=fine_spread is not None, ALWAYS=always_keys is not None, HAS_FIXED=fixed_logz is not None,
        HAS_COUNT=counter is not None, ROWWISE=rowwise, NATIVE=native, HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d), BLOCK_Q=block_q, BLOCK_C=block_c,
        BLOCK_P=max(2, triton.next_power_of_2(p)), BLOCK_S=TUNING["block_s"], BLOCK_K=TUNING["block_k"],
        NUM_STAGES=TUNING["num_stages"], POLL=TUNING["poll"], num_warps=TUNING["num_warps"], launch_cooperative_grid=True,
        **chain_launch(dev, "fused_lookup"),
    )
    return keep.view(torch.bool), pos, total
