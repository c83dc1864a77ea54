"""Triton kernels of the hierarchical centroid lookup; ``lookup.py`` holds the host side and documents the
algorithm. ``_lse_kernel``: partial log-normalisers of a program's clusters; ``_prob_kernel``: per-key
probability estimates, and with one query chunk the threshold decisions, the dropped coarse clusters'
partial log-normalisers and the kept segment lengths.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .chain import chain_enter
from .sparse_attention import _max, _sum


@triton.jit
def _load_q(q_base, s_qm, q0, q_hi, offs_d, d_ok, BLOCK_Q: tl.constexpr, NATIVE: tl.constexpr):
    """Queries q0 .. q0 + BLOCK_Q (those < q_hi; others 0) -> [BLOCK_Q, BLOCK_D], fp32 unless NATIVE."""
    offs_q = q0 + tl.arange(0, BLOCK_Q)
    qv = tl.load(q_base + offs_q[:, None] * s_qm + offs_d[None, :], mask=(offs_q < q_hi)[:, None] & d_ok[None, :],
                 other=0.0)
    # (single return: Triton also visits code after an early return in a static branch)
    if NATIVE:
        res = qv
    else:
        res = qv.to(tl.float32)
    return res


@triton.jit
def _load_cent(C, s_cc, offs_c, sel, offs_d, d_ok, NATIVE: tl.constexpr):
    cent = tl.load(C + offs_c[:, None] * s_cc + offs_d[None, :], mask=sel[:, None] & d_ok[None, :], other=0.0)
    if NATIVE:
        res = cent
    else:
        res = cent.to(tl.float32)
    return res


@triton.jit
def _query_tile(q_base, s_qm, q0, q_hi, offs_d, d_ok, CSCALE_ROW, BLOCK_Q: tl.constexpr, NATIVE: tl.constexpr,
                FP8: tl.constexpr):
    """A query tile as the centroid scores take it, and |q|^2 of q itself (the variance term's factor). With an
    8-bit centroid table the tile is times the head's per-dimension scales, so that q.c = (q * scale).table;
    the scales are powers of two (``centroid_fp8.quantize_centroids``), so the product is exact in fp32 and
    bf16 and the 16-bit native dot stays exact."""
    qv = _load_q(q_base, s_qm, q0, q_hi, offs_d, d_ok, BLOCK_Q, NATIVE)
    qn2 = _qnorm2(qv)
    if FP8:
        sc = tl.load(CSCALE_ROW + offs_d, mask=d_ok, other=0.0)
        qv = (qv.to(tl.float32) * sc[None, :]).to(qv.dtype)
    return qv, qn2


@triton.jit
def _widen(cent, qv, FP8: tl.constexpr, NATIVE: tl.constexpr):
    """An 8-bit centroid tile in the queries' 16-bit dtype for the native dot (exact: e4m3 is a subset of
    bf16); otherwise as ``_load_cent`` gave it (fp32 unless NATIVE)."""
    if FP8 and NATIVE:
        res = cent.to(qv.dtype)
    else:
        res = cent
    return res


@triton.jit
def _scores(qv, cent, scale, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, ROWWISE: tl.constexpr,
            NATIVE: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_Q, BLOCK_C] float32 logits s * q.c of a query tile against a centroid tile."""
    if ROWWISE:  # few queries: one fp32 multiply-reduce per query row, on CUDA cores
        offs_qb = tl.arange(0, BLOCK_Q)
        res = tl.full([BLOCK_Q, BLOCK_C], 0.0, tl.float32)
        for i in tl.static_range(BLOCK_Q):
            qrow = _sum(tl.where(offs_qb[:, None] == i, qv, 0.0), axis=0)
            row = _sum(cent * qrow[None, :], axis=1)
            res = tl.where(offs_qb[:, None] == i, row[None, :], res)
    elif NATIVE:  # 16-bit products are exact in fp32: the reference's numbers up to summation order
        res = tl.dot(qv, tl.trans(cent))
    else:
        res = tl.dot(qv, tl.trans(cent), input_precision=PRECISION)
    return res * scale


@triton.jit
def _qnorm2(qv):
    """|q|^2 [BLOCK_Q] in fp32 of a query tile."""
    qf = qv.to(tl.float32)
    return _sum(qf * qf, axis=1)


@triton.jit
def _add_spread(logits, SPREAD, offs_c, sel, qn2, half_s2, HAS_SPREAD: tl.constexpr):
    """logits + s^2 |q|^2 v_c / 2 (the variance term of the estimate; SPREAD points at this head's row)."""
    if HAS_SPREAD:
        v = tl.load(SPREAD + offs_c, mask=sel, other=0.0).to(tl.float32)
        res = logits + half_s2 * qn2[:, None] * v[None, :]
    else:
        res = logits
    return res


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
def _logaddexp(a, b):
    """log(exp(a) + exp(b)) elementwise, -inf where both are -inf."""
    top = tl.maximum(a, b)
    top = tl.where(top == float("-inf"), 0.0, top)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def _reduce_parts(PART, s_pk, nb, offs_q, q_ok, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """logsumexp over the nb partial rows PART[k, q] for the queries offs_q -> [BLOCK_Q]."""
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    s = tl.full([BLOCK_Q], 0.0, tl.float32)
    offs_p = tl.arange(0, BLOCK_P)
    for k0 in range(0, nb, BLOCK_P):
        kk = k0 + offs_p
        v = tl.load(PART + kk[:, None] * s_pk + offs_q[None, :], mask=(kk < nb)[:, None] & q_ok[None, :],
                    other=float("-inf"))
        m_new = tl.maximum(m, _max(v, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + _sum(tl.exp(v - m_safe[None, :]), axis=0)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe + tl.log(s)  # -inf where every partial is -inf


@triton.jit
def _head_logz(PART_ROW, s_pk, NB, FIXED_ROW, offs_q, q_ok, HAS_FIXED: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_Q: tl.constexpr):
    """log Z of each query of one (b, h): logsumexp of its NB partial rows, plus the always-attended keys'
    exact log-normaliser with HAS_FIXED; 0 in padding rows."""
    logz = _reduce_parts(PART_ROW, s_pk, NB, offs_q, q_ok, BLOCK_P, BLOCK_Q)
    if HAS_FIXED:  # exact log-normaliser of the always-attended keys, given apart
        logz = _logaddexp(logz, tl.load(FIXED_ROW + offs_q, mask=q_ok, other=float("-inf")))
    return tl.where(q_ok, logz, 0.0)


@triton.jit
def _online(m, s, t):
    """One online log-sum-exp step: running (max m, sum s) [BLOCK_Q] of a query tile updated with the terms
    t [BLOCK_Q, BLOCK_C] (-inf for none)."""
    m_new = tl.maximum(m, _max(t, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - m_safe) + _sum(tl.exp(t - m_safe[:, None]), axis=1)


@triton.jit
def _finish_lse(m, s):
    """log of the running sum of ``_online`` (-inf where nothing was added)."""
    return tl.where(m == float("-inf"), 0.0, m) + tl.log(s)


@triton.jit
def _always_state(qv, K, s_kn, N, SINK, WINDOW, scale, offs_d, d_ok, BLOCK_Q: tl.constexpr,
                  BLOCK_C: tl.constexpr, ROWWISE: tl.constexpr, NATIVE: tl.constexpr, PRECISION: tl.constexpr):
    """Online log-sum-exp state (m, s) of a query tile over exp(s q.k) of the always-attended keys of one head
    (K points at its rows): the sinks, then the window's sorted positions."""
    offs_kb = tl.arange(0, BLOCK_C)
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    s = tl.full([BLOCK_Q], 0.0, tl.float32)
    for k0 in range(0, SINK + WINDOW, BLOCK_C):
        i = k0 + offs_kb
        k_ok = i < SINK + WINDOW
        pos = tl.where(i < SINK, i, N - WINDOW + (i - SINK)).to(tl.int64)
        kv = _load_cent(K, s_kn, pos, k_ok, offs_d, d_ok, NATIVE)
        t = tl.where(k_ok[None, :], _scores(qv, kv, scale, BLOCK_Q, BLOCK_C, ROWWISE, NATIVE, PRECISION),
                     float("-inf"))
        m, s = _online(m, s, t)
    return m, s


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
