"""Triton kernels of the hierarchical centroid lookup; ``lookup.py`` holds the host side and documents the
algorithm. ``_lse_kernel``: partial log-normalisers of a program's clusters; ``_prob_kernel``: per-key
probability estimates, and with one query chunk the threshold decisions, the dropped coarse clusters'
partial log-normalisers and the kept segment lengths.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .chain import chain_enter
from .lookup_tiles import (_add_spread, _always_state, _finish_lse, _load_cent, _load_q, _logaddexp, _online,
                           _query_tile, _reduce_parts, _scores, _widen)
from .sparse_attention import _max, _sum


@triton.jit
def _unit(g, b, h, NC, KEEPC, s_kb, s_kh, COFF, s_oh, BY_PARENT: tl.constexpr, BLOCK_C: tl.constexpr):
    """Cluster range [lo, hi) of unit g of the program and whether it is active (int32 1): the fine clusters of
    coarse cluster g (active when kept), or block g of BLOCK_C clusters. (Masks combine with
    ``offs * 0 + active > 0``: the interpreter mistypes ``bool vector & bool scalar``.)"""
    if BY_PARENT:
        lo = tl.load(COFF + h * s_oh + g).to(tl.int32)
        hi = tl.load(COFF + h * s_oh + g + 1).to(tl.int32)
        active = (tl.load(KEEPC + b * s_kb + h * s_kh + g) != 0).to(tl.int32)
    else:
        lo = g * BLOCK_C
        hi = tl.minimum(lo + BLOCK_C, NC)
        active = (lo < hi).to(tl.int32)
    return lo, hi, active


@triton.jit
def _program_ranges(pid_c, pid_q, NCC, NQ, Q_PER_PROG, GROUP: tl.constexpr):
    """A program's units [g_lo, g_hi) (its GROUP coarse parents, or its GROUP blocks of BLOCK_C clusters; NCC
    units in all) and queries [q_lo, q_hi) of its query chunk: the shared preamble of ``_lse_kernel`` and
    ``_prob_kernel``."""
    g_lo = pid_c * GROUP
    g_hi = tl.minimum(g_lo + GROUP, NCC)
    q_lo = pid_q * Q_PER_PROG
    q_hi = tl.minimum(q_lo + Q_PER_PROG, NQ)
    return g_lo, g_hi, q_lo, q_hi


@triton.jit
def _always_part(Q, K, PART, s_qm, s_kh, s_kn, s_pk, q_base, part_base, h, pid_c, q_lo, q_hi, N, SINK, WINDOW,
                 scale, offs_d, d_ok, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, ROWWISE: tl.constexpr,
                 NATIVE: tl.constexpr, PRECISION: tl.constexpr):
    """Partial row pid_c = log sum_k exp(s q.k) over the always-attended keys of head h, for the queries
    q_lo .. q_hi: ``always_logz_ref`` as one more partial."""
    offs_qb = tl.arange(0, BLOCK_Q)
    for q0 in range(q_lo, q_hi, BLOCK_Q):
        offs_q = q0 + offs_qb
        qv = _load_q(q_base, s_qm, q0, q_hi, offs_d, d_ok, BLOCK_Q, NATIVE)
        m, s = _always_state(qv, K + h * s_kh, s_kn, N, SINK, WINDOW, scale, offs_d, d_ok, BLOCK_Q, BLOCK_C,
                             ROWWISE, NATIVE, PRECISION)
        tl.store(part_base + pid_c * s_pk + offs_q, _finish_lse(m, s), mask=offs_q < q_hi)


@triton.jit
def _lse_tile(m, s, c0, hi, qv, qn2, offs_q, q_ok, C, s_cc, SIZES, SPREAD, KEEPC, LOGITS, s_gq, offs_cb, offs_d,
              d_ok, scale, half_s2, CSCALE_ROW, FP8: tl.constexpr, DROPPED: tl.constexpr,
              STORE_LOGITS: tl.constexpr, ROWWISE: tl.constexpr,
              NATIVE: tl.constexpr, PRECISION: tl.constexpr, HAS_SPREAD: tl.constexpr, BLOCK_Q: tl.constexpr,
              BLOCK_C: tl.constexpr):
    """Online log-sum-exp (m, s) of a query tile over the clusters c0 .. c0 + BLOCK_C (those < hi; with DROPPED
    only the dropped ones) of one head (pointers at its rows); with STORE_LOGITS the logits are stored too."""
    offs_c = c0 + offs_cb
    sel = offs_c < hi
    if DROPPED:
        sel = sel & (tl.load(KEEPC + offs_c, mask=sel, other=1) == 0)
    cent = _widen(_load_cent(C, s_cc, offs_c, sel, offs_d, d_ok, NATIVE), qv, FP8, NATIVE)
    logn = tl.log(tl.load(SIZES + offs_c, mask=sel, other=1).to(tl.float32))
    logits = _scores(qv, cent, scale, BLOCK_Q, BLOCK_C, ROWWISE, NATIVE, PRECISION)
    logits = _add_spread(logits, SPREAD, offs_c, sel, qn2, half_s2, HAS_SPREAD)
    if STORE_LOGITS:
        tl.store(LOGITS + offs_q[:, None] * s_gq + offs_c[None, :], logits, mask=q_ok[:, None] & sel[None, :])
    return _online(m, s, tl.where(sel[None, :], logits + logn[None, :], float("-inf")))


@triton.jit
def _lse_kernel(
    Q, C, SIZES, KEEPC, COFF, ALLOWED, PART, LOGITS, SPREAD, K, CSCALE,
    s_qb, s_qh, s_qm, s_ch, s_cc, s_sh, s_kb, s_kh, s_oh, s_ab, s_ah, s_pb, s_ph, s_pk, s_gb, s_gh, s_gq, s_vh,
    s_akh, s_akn, s_xsh,
    HK, NQ, NC, NCC, Q_PER_PROG, scale, half_s2, NB, N, SINK, WINDOW,
    BY_PARENT: tl.constexpr,  # program = GROUP coarse clusters, their fine clusters active when kept; writes ALLOWED
    GROUP: tl.constexpr, DROPPED: tl.constexpr,  # DROPPED: block of coarse clusters, selecting KEEPC == 0
    STORE_LOGITS: tl.constexpr, ROWWISE: tl.constexpr, NATIVE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr, HAS_SPREAD: tl.constexpr,
    FP8: tl.constexpr,  # C holds 8-bit centroids, CSCALE [Hk, D] their per-dimension scales
    ALWAYS: tl.constexpr,  # one more program per (query chunk, b * h), pid_c == NB: the always-attended keys
    PDL: tl.constexpr = 0,
):
    chain_enter(PDL)
    pid_c = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    if ALWAYS:  # the extra program: its clusters are past NC (nothing to score) and it skips the store below
        if pid_c == NB:
            q_lo = pid_q * Q_PER_PROG
            _always_part(Q, K, PART, s_qm, s_akh, s_akn, s_pk, Q + b * s_qb + h * s_qh, PART + b * s_pb + h * s_ph,
                         h, pid_c, q_lo, tl.minimum(q_lo + Q_PER_PROG, NQ), N, SINK, WINDOW, scale,
                         tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_D) < HEAD_DIM, BLOCK_Q, BLOCK_C, ROWWISE,
                         NATIVE, PRECISION)
    g_lo, g_hi, q_lo, q_hi = _program_ranges(pid_c, pid_q, NCC, NQ, Q_PER_PROG, GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    offs_cb = tl.arange(0, BLOCK_C)
    offs_qb = tl.arange(0, BLOCK_Q)
    d_ok = offs_d < HEAD_DIM
    q_base = Q + b * s_qb + h * s_qh
    c_h, sizes_h, spread_h = C + h * s_ch, SIZES + h * s_sh, SPREAD + h * s_vh  # this head's rows
    keepc_h, logits_h = KEEPC + b * s_kb + h * s_kh, LOGITS + b * s_gb + h * s_gh
    if BY_PARENT:
        if pid_q == 0:
            for g in range(g_lo, g_hi):
                lo, hi, active = _unit(g, b, h, NC, KEEPC, s_kb, s_kh, COFF, s_oh, BY_PARENT, BLOCK_C)
                for c0 in range(lo, hi, BLOCK_C):
                    offs_c = c0 + offs_cb
                    tl.store(ALLOWED + b * s_ab + h * s_ah + offs_c, (offs_c * 0 + active).to(tl.uint8),
                             mask=offs_c < hi)
    for q0 in range(q_lo, q_hi, BLOCK_Q):
        offs_q = q0 + offs_qb
        q_ok = offs_q < q_hi
        qv, qn2 = _query_tile(q_base, s_qm, q0, q_hi, offs_d, d_ok, CSCALE + h * s_xsh, BLOCK_Q, NATIVE, FP8)
        m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        s = tl.full([BLOCK_Q], 0.0, tl.float32)
        if BY_PARENT:
            for g in range(g_lo, g_hi):
                lo, hi, active = _unit(g, b, h, NC, KEEPC, s_kb, s_kh, COFF, s_oh, BY_PARENT, BLOCK_C)
                if active > 0:
                    for c0 in range(lo, hi, BLOCK_C):
                        m, s = _lse_tile(m, s, c0, hi, qv, qn2, offs_q, q_ok, c_h, s_cc, sizes_h, spread_h,
                                         keepc_h, logits_h, s_gq, offs_cb, offs_d, d_ok, scale, half_s2,
                                         CSCALE + h * s_xsh, FP8, DROPPED,
                                         STORE_LOGITS, ROWWISE, NATIVE, PRECISION, HAS_SPREAD, BLOCK_Q, BLOCK_C)
        else:  # GROUP consecutive blocks: one straight loop, so the compiler can pipeline the centroid loads
            hi = tl.minimum(g_hi * BLOCK_C, NC)
            for c0 in range(g_lo * BLOCK_C, hi, BLOCK_C):
                m, s = _lse_tile(m, s, c0, hi, qv, qn2, offs_q, q_ok, c_h, s_cc, sizes_h, spread_h, keepc_h,
                                 logits_h, s_gq, offs_cb, offs_d, d_ok, scale, half_s2, CSCALE + h * s_xsh, FP8,
                                 DROPPED, STORE_LOGITS,
                                 ROWWISE, NATIVE, PRECISION, HAS_SPREAD, BLOCK_Q, BLOCK_C)
        tl.store(PART + b * s_pb + h * s_ph + pid_c * s_pk + offs_q, _finish_lse(m, s),
                 mask=q_ok & (offs_q * 0 + pid_c < NB))


@triton.jit
def _prob_kernel(
    Q, C, SIZES, KEEPC, COFF, ALLOWED, LOGZ, PART, PART2, THR, PSUM, KEEP, DPART, SEGLEN, LOGITS, SPREAD, FIXED, PROBS,
    CSCALE, s_xsh,
    s_qb, s_qh, s_qm, s_ch, s_cc, s_sh, s_kb, s_kh, s_oh, s_ab, s_ah, s_zb, s_zh,
    s_pb, s_ph, s_pk, s_p2b, s_p2h, s_p2k, s_rb, s_rh, s_rq, s_eb, s_eh, s_db, s_dh, s_dk, s_gb, s_gh, s_gq,
    s_vh, s_fb, s_fh, s_xb, s_xh,
    HK, NQ, NC, NCC, NB1, NB2, Q_PER_PROG, NT, scale, half_s2, sink_len, window_len,
    BY_PARENT: tl.constexpr, GROUP: tl.constexpr, HAS_ALLOWED: tl.constexpr, FUSED: tl.constexpr,
    HAS_PART2: tl.constexpr, FINISH: tl.constexpr, DECIDE: tl.constexpr, WRITE_DROPPED: tl.constexpr,
    WRITE_SEGLEN: tl.constexpr, LOAD_LOGITS: tl.constexpr, ROWWISE: tl.constexpr,
    NATIVE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr, HAS_SPREAD: tl.constexpr,
    HAS_FIXED: tl.constexpr, FP8: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    """Sums over each query tile of exp(logit - log Z_q) into its own row PSUM[b, h, pid_q * NT + tile, c]
    (written once, never read back by another thread before a barrier); with FINISH (one query chunk), the
    rows are summed into PROBS[b, h, c] / NQ and the decisions taken from those values."""
    chain_enter(PDL)
    pid_c = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    g_lo, g_hi, q_lo, q_hi = _program_ranges(pid_c, pid_q, NCC, NQ, Q_PER_PROG, GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    offs_cb = tl.arange(0, BLOCK_C)
    offs_qb = tl.arange(0, BLOCK_Q)
    d_ok = offs_d < HEAD_DIM
    q_base = Q + b * s_qb + h * s_qh
    psum_base = PSUM + b * s_rb + h * s_rh
    for tile in range(NT):  # every row is written (tiles past q_hi store zeros)
        q0 = q_lo + tile * BLOCK_Q
        row_base = psum_base + (pid_q * NT + tile) * s_rq
        offs_q = q0 + offs_qb
        q_ok = offs_q < q_hi
        if FUSED:
            logz = _reduce_parts(PART + b * s_pb + h * s_ph, s_pk, NB1, offs_q, q_ok, BLOCK_P, BLOCK_Q)
            if HAS_PART2:
                logz2 = _reduce_parts(PART2 + b * s_p2b + h * s_p2h, s_p2k, NB2, offs_q, q_ok, BLOCK_P, BLOCK_Q)
                logz = _logaddexp(logz, logz2)
        else:
            logz = tl.load(LOGZ + b * s_zb + h * s_zh + offs_q, mask=q_ok, other=0.0)
        if HAS_FIXED:  # exact log-normaliser of the always-attended keys
            fz = tl.load(FIXED + b * s_fb + h * s_fh + offs_q, mask=q_ok, other=float("-inf"))
            logz = _logaddexp(logz, fz)
        logz = tl.where(q_ok, logz, 0.0)
        qv, qn2 = _query_tile(q_base, s_qm, q0, q_hi, offs_d, d_ok, CSCALE + h * s_xsh, BLOCK_Q, NATIVE, FP8)
        for g in range(g_lo, g_hi):
            lo, hi, active = _unit(g, b, h, NC, KEEPC, s_kb, s_kh, COFF, s_oh, BY_PARENT, BLOCK_C)
            for c0 in range(lo, hi, BLOCK_C):
                offs_c = c0 + offs_cb
                c_ok = offs_c < hi
                sel = c_ok & (offs_c * 0 + active > 0)
                if HAS_ALLOWED:
                    sel = sel & (tl.load(ALLOWED + b * s_ab + h * s_ah + offs_c, mask=c_ok, other=0) != 0)
                acc = tl.full([BLOCK_C], 0.0, tl.float32)
                if active > 0:
                    if LOAD_LOGITS:
                        logits = tl.load(LOGITS + b * s_gb + h * s_gh + offs_q[:, None] * s_gq + offs_c[None, :],
                                         mask=q_ok[:, None] & sel[None, :], other=0.0)
                    else:
                        cent = _widen(_load_cent(C + h * s_ch, s_cc, offs_c, sel, offs_d, d_ok, NATIVE), qv,
                                      FP8, NATIVE)
                        logits = _scores(qv, cent, scale, BLOCK_Q, BLOCK_C, ROWWISE, NATIVE, PRECISION)
                        logits = _add_spread(logits, SPREAD + h * s_vh, offs_c, sel, qn2, half_s2, HAS_SPREAD)
                    p = tl.exp(logits - logz[:, None])
                    acc = _sum(tl.where(q_ok[:, None] & sel[None, :], p, 0.0), axis=0)
                tl.store(row_base + offs_c, acc, mask=c_ok)
    if FINISH:  # one query chunk (pid_q == 0): probabilities and decisions here
        tl.debug_barrier()  # the rows this program's threads wrote
        for g in range(g_lo, g_hi):
            lo, hi, active = _unit(g, b, h, NC, KEEPC, s_kb, s_kh, COFF, s_oh, BY_PARENT, BLOCK_C)
            for c0 in range(lo, hi, BLOCK_C):
                offs_c = c0 + offs_cb
                c_ok = offs_c < hi
                sel = c_ok & (offs_c * 0 + active > 0)
                if HAS_ALLOWED:
                    sel = sel & (tl.load(ALLOWED + b * s_ab + h * s_ah + offs_c, mask=c_ok, other=0) != 0)
                tot = tl.full([BLOCK_C], 0.0, tl.float32)
                for tile in range(NT):
                    tot += tl.load(psum_base + tile * s_rq + offs_c, mask=c_ok, other=0.0)
                probs = tot / NQ
                tl.store(PROBS + b * s_xb + h * s_xh + offs_c, probs, mask=c_ok)
                if DECIDE:
                    keep = sel & (probs >= tl.load(THR + h))
                    tl.store(KEEP + b * s_xb + h * s_xh + offs_c, keep.to(tl.uint8), mask=c_ok)
                    if WRITE_DROPPED:  # block mode: this block's dropped clusters' log-normaliser
                        dropped = c_ok & ~keep
                        logn = tl.log(tl.load(SIZES + h * s_sh + offs_c, mask=c_ok, other=1).to(tl.float32))
                        cent = _load_cent(C + h * s_ch, s_cc, offs_c, c_ok, offs_d, d_ok, NATIVE)
                        for q0 in range(0, NQ, BLOCK_Q):
                            offs_q = q0 + offs_qb
                            qv, qn2 = _query_tile(q_base, s_qm, q0, NQ, offs_d, d_ok, CSCALE + h * s_xsh, BLOCK_Q,
                                                  NATIVE, FP8)
                            logits = _scores(qv, _widen(cent, qv, FP8, NATIVE), scale, BLOCK_Q, BLOCK_C, ROWWISE,
                                             NATIVE, PRECISION)
                            logits = _add_spread(logits, SPREAD + h * s_vh, offs_c, c_ok, qn2, half_s2, HAS_SPREAD)
                            t = tl.where(dropped[None, :], logits + logn[None, :], float("-inf"))
                            mx = _max(t, axis=1)
                            mx = tl.where(mx == float("-inf"), 0.0, mx)
                            tl.store(DPART + b * s_db + h * s_dh + pid_c * s_dk + offs_q,
                                     mx + tl.log(_sum(tl.exp(t - mx[:, None]), axis=1)), mask=offs_q < NQ)
                    if WRITE_SEGLEN:
                        size = tl.load(SIZES + h * s_sh + offs_c, mask=c_ok, other=0)
                        g_base = SEGLEN + b * s_eb + h * s_eh
                        tl.store(g_base + 1 + offs_c, tl.where(keep, size, 0).to(tl.int32), mask=c_ok)
        if WRITE_SEGLEN:
            if pid_c == 0:
                ends = tl.arange(0, 2)
                tl.store(SEGLEN + b * s_eb + h * s_eh + ends * (NC + 1),
                         tl.where(ends == 0, sink_len, window_len).to(tl.int32))
