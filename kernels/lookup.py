"""Hierarchical centroid lookup in Triton (same contract as ``centroid_lookup_ref``).

Per level, grid ``(cluster blocks, query chunks, B * Hk)``:

``_lse_kernel``    partial log-normalisers ``logsumexp_c(s * q.c + log n_c)`` of a block of clusters for every
                   query, over the block's *selected* clusters (all; fine clusters under kept coarse parents;
                   dropped coarse clusters). With few queries it also keeps the logits in a scratch buffer.
``_prob_kernel``   reduces the partials to ``log Z_q`` and sums ``exp(s * q.c - log Z_q)`` over the queries:
                   the per-key probability estimate of each cluster (divided by Q). With one query chunk it
                   also decides ``keep`` against the threshold in-kernel, writes the dropped coarse clusters'
                   partial log-normalisers (the coarse terms of the hierarchical denominator) and the kept
                   segment lengths.
``_coarse_decode_kernel``  the whole coarse level for few queries (decode) in one program per head.
``_positions_kernel``      kept segment lengths -> sorted position of every kept key (for the sparse kernel),
                   with no host sync.

Few queries (decode, ``Q <= 16``) score row by row in exact fp32 on CUDA cores; many queries use ``tl.dot``
with ``precision`` "ieee" (exact fp32, default, so keep decisions match the reference except for ties within
rounding) or "tf32" (much faster for prefill). Budget mode sorts the Triton-computed probabilities with torch
(``_budget_mask`` of the reference). Centroid loads of unselected clusters are masked off, so the fine level
reads only the centroids under kept coarse clusters.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import _budget_mask
from .sparse_attention import _count_le, _cumsum, _max, _sum, segment_lows

__all__ = ["centroid_lookup", "centroid_lookup_positions", "centroid_probs", "kept_positions"]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _logits(q_base, s_qm, q0, q_hi, offs_d, d_ok, cent, scale,
            BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, ROWWISE: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_Q, BLOCK_C] float32 logits s * q.c of queries q0 .. q0 + BLOCK_Q (those < q_hi; others 0)
    against a block of centroids [BLOCK_C, BLOCK_D]."""
    offs_qb = tl.arange(0, BLOCK_Q)
    if ROWWISE:  # few queries: one exact fp32 multiply-reduce per query row, on CUDA cores
        out = tl.full([BLOCK_Q, BLOCK_C], 0.0, tl.float32)
        for i in tl.static_range(BLOCK_Q):
            qrow = tl.load(q_base + (q0 + i) * s_qm + offs_d, mask=d_ok & (offs_d * 0 + q0 + i < q_hi), other=0.0)
            row = _sum(cent * qrow.to(tl.float32)[None, :], axis=1)
            out = tl.where(offs_qb[:, None] == i, row[None, :], out)
        return out * scale
    offs_q = q0 + offs_qb
    qv = tl.load(q_base + offs_q[:, None] * s_qm + offs_d[None, :], mask=(offs_q < q_hi)[:, None] & d_ok[None, :],
                 other=0.0).to(tl.float32)
    return tl.dot(qv, tl.trans(cent), input_precision=PRECISION) * scale


@triton.jit
def _block_lse(logits, logn, sel):
    """[BLOCK_Q, BLOCK_C] logits -> [BLOCK_Q] logsumexp of logits + log n over the selected clusters."""
    t = tl.where(sel[None, :], logits + logn[None, :], float("-inf"))
    mx = _max(t, axis=1)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    return mx_safe + tl.log(_sum(tl.exp(t - mx_safe[:, None]), axis=1))


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
def _lse_kernel(
    Q, C, SIZES, KEEPC, COFF, ALLOWED, PART, LOGITS,
    s_qb, s_qh, s_qm, s_ch, s_cc, s_sh, s_kb, s_kh, s_oh, s_ab, s_ah, s_pb, s_ph, s_pk, s_gb, s_gh, s_gq,
    HK, NQ, NC, NCC, Q_PER_PROG, scale,
    MODE: tl.constexpr,  # 0: all clusters, 1: fine under kept coarse parents (writes ALLOWED), 2: dropped coarse
    STORE_LOGITS: tl.constexpr, ROWWISE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
    LOG_CC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    c_ok = offs_c < NC
    d_ok = offs_d < HEAD_DIM
    if MODE == 1:
        parent = _count_le(COFF + h * s_oh + 1, NCC, offs_c, LOG_CC)
        kc = tl.load(KEEPC + b * s_kb + h * s_kh + parent, mask=c_ok, other=0)
        sel = c_ok & (kc != 0)
        if pid_q == 0:
            tl.store(ALLOWED + b * s_ab + h * s_ah + offs_c, sel.to(tl.uint8), mask=c_ok)
    elif MODE == 2:
        kc = tl.load(KEEPC + b * s_kb + h * s_kh + offs_c, mask=c_ok, other=1)
        sel = c_ok & (kc == 0)
    else:
        sel = c_ok
    n_sel = _sum(sel.to(tl.int32), axis=0)
    part_base = PART + b * s_pb + h * s_ph + pid_c * s_pk
    q_base = Q + b * s_qb + h * s_qh
    offs_qb = tl.arange(0, BLOCK_Q)
    q_lo = pid_q * Q_PER_PROG
    q_hi = tl.minimum(q_lo + Q_PER_PROG, NQ)
    if n_sel > 0:
        logn = tl.log(tl.load(SIZES + h * s_sh + offs_c, mask=sel, other=1).to(tl.float32))
        cent = tl.load(C + h * s_ch + offs_c[:, None] * s_cc + offs_d[None, :],
                       mask=sel[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        for q0 in range(q_lo, q_hi, BLOCK_Q):
            offs_q = q0 + offs_qb
            q_ok = offs_q < q_hi
            logits = _logits(q_base, s_qm, q0, q_hi, offs_d, d_ok, cent, scale, BLOCK_Q, BLOCK_C, ROWWISE,
                             PRECISION)
            tl.store(part_base + offs_q, _block_lse(logits, logn, sel), mask=q_ok)
            if STORE_LOGITS:
                tl.store(LOGITS + b * s_gb + h * s_gh + offs_q[:, None] * s_gq + offs_c[None, :], logits,
                         mask=q_ok[:, None] & sel[None, :])
    else:
        for q0 in range(q_lo, q_hi, BLOCK_Q):
            offs_q = q0 + offs_qb
            tl.store(part_base + offs_q, tl.full([BLOCK_Q], float("-inf"), tl.float32), mask=offs_q < q_hi)


@triton.jit
def _prob_kernel(
    Q, C, SIZES, ALLOWED, LOGZ, PART, PART2, THR, PSUM, KEEP, DPART, SEGLEN, LOGITS,
    s_qb, s_qh, s_qm, s_ch, s_cc, s_sh, s_ab, s_ah, s_zb, s_zh,
    s_pb, s_ph, s_pk, s_p2b, s_p2h, s_p2k, s_rb, s_rh, s_rq, s_kb, s_kh, s_db, s_dh, s_dk, s_eb, s_eh,
    s_gb, s_gh, s_gq,
    HK, NQ, NC, NB1, NB2, Q_PER_PROG, scale, sink_len, window_len,
    HAS_ALLOWED: tl.constexpr, FUSED: tl.constexpr, HAS_PART2: tl.constexpr, FINISH: tl.constexpr, DECIDE: tl.constexpr,
    WRITE_DROPPED: tl.constexpr, WRITE_SEGLEN: tl.constexpr, LOAD_LOGITS: tl.constexpr, ROWWISE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_qb = tl.arange(0, BLOCK_Q)
    c_ok = offs_c < NC
    d_ok = offs_d < HEAD_DIM
    if HAS_ALLOWED:
        sel = c_ok & (tl.load(ALLOWED + b * s_ab + h * s_ah + offs_c, mask=c_ok, other=0) != 0)
    else:
        sel = c_ok
    n_sel = _sum(sel.to(tl.int32), axis=0)
    # Dropped coarse clusters still need their logits (for the partial denominator): load every cluster then.
    if WRITE_DROPPED:
        load_ok = c_ok
    else:
        load_ok = sel
    q_base = Q + b * s_qb + h * s_qh
    q_lo = pid_q * Q_PER_PROG
    q_hi = tl.minimum(q_lo + Q_PER_PROG, NQ)
    acc = tl.full([BLOCK_C], 0.0, tl.float32)
    if LOAD_LOGITS:
        cent = tl.full([BLOCK_C, BLOCK_D], 0.0, tl.float32)
    else:
        cent = tl.load(C + h * s_ch + offs_c[:, None] * s_cc + offs_d[None, :],
                       mask=load_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if n_sel > 0:
        for q0 in range(q_lo, q_hi, BLOCK_Q):
            offs_q = q0 + offs_qb
            q_ok = offs_q < q_hi
            if FUSED:
                logz = _reduce_parts(PART + b * s_pb + h * s_ph, s_pk, NB1, offs_q, q_ok, BLOCK_P, BLOCK_Q)
                if HAS_PART2:
                    logz2 = _reduce_parts(PART2 + b * s_p2b + h * s_p2h, s_p2k, NB2, offs_q, q_ok, BLOCK_P, BLOCK_Q)
                    hi = tl.maximum(logz, logz2)
                    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
                    logz = hi_safe + tl.log(tl.exp(logz - hi_safe) + tl.exp(logz2 - hi_safe))
            else:
                logz = tl.load(LOGZ + b * s_zb + h * s_zh + offs_q, mask=q_ok, other=0.0)
            logz = tl.where(q_ok, logz, 0.0)
            if LOAD_LOGITS:
                logits = tl.load(LOGITS + b * s_gb + h * s_gh + offs_q[:, None] * s_gq + offs_c[None, :],
                                 mask=q_ok[:, None] & sel[None, :], other=0.0)
            else:
                logits = _logits(q_base, s_qm, q0, q_hi, offs_d, d_ok, cent, scale, BLOCK_Q, BLOCK_C, ROWWISE,
                                 PRECISION)
            p = tl.exp(logits - logz[:, None])
            acc += _sum(tl.where(q_ok[:, None] & sel[None, :], p, 0.0), axis=0)
    if FINISH:  # one query chunk: probabilities and decisions here
        probs = acc / NQ
        tl.store(PSUM + b * s_rb + h * s_rh + offs_c, probs, mask=c_ok)
        if DECIDE:
            keep = sel & (probs >= tl.load(THR + h))
            tl.store(KEEP + b * s_kb + h * s_kh + offs_c, keep.to(tl.uint8), mask=c_ok)
            if WRITE_DROPPED:
                dropped = c_ok & ~keep
                logn = tl.log(tl.load(SIZES + h * s_sh + offs_c, mask=c_ok, other=1).to(tl.float32))
                d_base = DPART + b * s_db + h * s_dh + pid_c * s_dk
                for q0 in range(0, NQ, BLOCK_Q):
                    offs_q = q0 + offs_qb
                    q_ok = offs_q < NQ
                    logits = _logits(q_base, s_qm, q0, NQ, offs_d, d_ok, cent, scale, BLOCK_Q, BLOCK_C,
                                     ROWWISE, PRECISION)
                    tl.store(d_base + offs_q, _block_lse(logits, logn, dropped), mask=q_ok)
            if WRITE_SEGLEN:
                size = tl.load(SIZES + h * s_sh + offs_c, mask=c_ok, other=0)
                g_base = SEGLEN + b * s_eb + h * s_eh
                tl.store(g_base + 1 + offs_c, tl.where(keep, size, 0).to(tl.int32), mask=c_ok)
                if pid_c == 0:
                    ends = tl.arange(0, 2)
                    tl.store(g_base + ends * (NC + 1), tl.where(ends == 0, sink_len, window_len).to(tl.int32))
    else:  # partial sums over this query chunk; torch finishes
        tl.store(PSUM + b * s_rb + h * s_rh + pid_q * s_rq + offs_c, acc, mask=c_ok)


@triton.jit
def _coarse_decode_kernel(
    Q, C, SIZES, COFF, THR, PROBS, KEEP, EXTRA, READ, LOGITS,
    s_qb, s_qh, s_qm, s_ch, s_cc, s_sh, s_oh, s_rb, s_rh, s_eb, s_eh, s_gb, s_gh, s_gq,
    HK, NQ, NC, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The coarse level for few queries, one program per (batch, KV head): logits, log Z, probabilities,
    threshold, the dropped clusters' log-normaliser (EXTRA [Q]) and the centroids read (READ)."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_cb = tl.arange(0, BLOCK_C)
    d_ok = offs_d < HEAD_DIM
    q_ok = offs_q < NQ
    q_base = Q + b * s_qb + h * s_qh
    g_base = LOGITS + b * s_gb + h * s_gh
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    s = tl.full([BLOCK_Q], 0.0, tl.float32)
    for c0 in range(0, NC, BLOCK_C):  # pass 1: logits (kept in scratch) and log Z
        offs_c = c0 + offs_cb
        c_ok = offs_c < NC
        cent = tl.load(C + h * s_ch + offs_c[:, None] * s_cc + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :],
                       other=0.0).to(tl.float32)
        logn = tl.log(tl.load(SIZES + h * s_sh + offs_c, mask=c_ok, other=1).to(tl.float32))
        logits = _logits(q_base, s_qm, 0, NQ, offs_d, d_ok, cent, scale, BLOCK_Q, BLOCK_C, True, "ieee")
        tl.store(g_base + offs_q[:, None] * s_gq + offs_c[None, :], logits, mask=q_ok[:, None] & c_ok[None, :])
        t = tl.where(c_ok[None, :], logits + logn[None, :], float("-inf"))
        m_new = tl.maximum(m, _max(t, axis=1))
        s = s * tl.exp(m - m_new) + _sum(tl.exp(t - m_new[:, None]), axis=1)
        m = m_new
    logz = tl.where(q_ok, m + tl.log(s), 0.0)
    thr = tl.load(THR + h)
    dm = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    ds = tl.full([BLOCK_Q], 0.0, tl.float32)
    n_read = NC * 0
    for c0 in range(0, NC, BLOCK_C):  # pass 2: probabilities, keep, dropped log-normaliser
        offs_c = c0 + offs_cb
        c_ok = offs_c < NC
        logits = tl.load(g_base + offs_q[:, None] * s_gq + offs_c[None, :], mask=q_ok[:, None] & c_ok[None, :],
                         other=0.0)
        p = tl.where(q_ok[:, None] & c_ok[None, :], tl.exp(logits - logz[:, None]), 0.0)
        probs = _sum(p, axis=0) / NQ
        keep = c_ok & (probs >= thr)
        tl.store(PROBS + b * s_rb + h * s_rh + offs_c, probs, mask=c_ok)
        tl.store(KEEP + b * s_rb + h * s_rh + offs_c, keep.to(tl.uint8), mask=c_ok)
        lo = tl.load(COFF + h * s_oh + offs_c, mask=c_ok, other=0)
        hi = tl.load(COFF + h * s_oh + offs_c + 1, mask=c_ok, other=0)
        n_read += _sum(tl.where(keep, hi - lo, 0), axis=0).to(tl.int32)
        logn = tl.log(tl.load(SIZES + h * s_sh + offs_c, mask=c_ok, other=1).to(tl.float32))
        t = tl.where((c_ok & ~keep)[None, :], logits + logn[None, :], float("-inf"))
        dm_new = tl.maximum(dm, _max(t, axis=1))
        dm_safe = tl.where(dm_new == float("-inf"), 0.0, dm_new)
        ds = ds * tl.exp(dm - dm_safe) + _sum(tl.exp(t - dm_safe[:, None]), axis=1)
        dm = dm_new
    dm_safe = tl.where(dm == float("-inf"), 0.0, dm)
    tl.store(EXTRA + b * s_eb + h * s_eh + offs_q, dm_safe + tl.log(ds), mask=q_ok)
    tl.store(READ + pid_bh + tl.arange(0, 1), (n_read + NC).to(tl.int64) + tl.full([1], 0, tl.int64))


@triton.jit
def _positions_kernel(
    SEGLEN, LOWS, POS, TOTAL,
    s_eb, s_eh, s_lb, s_lh, s_pb, s_ph,
    HK, R,
    BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Segment lengths [R] -> pos[b, h, i] = sorted position of kept key i (segments in order), and TOTAL."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    e_base = SEGLEN + b * s_eb + h * s_eh
    start = pid_s * BLOCK_S
    offs_p = tl.arange(0, BLOCK_P)
    prefix = _sum(tl.full([BLOCK_P], 0, tl.int32), axis=0)
    for k0 in range(0, start, BLOCK_P):  # keys kept before this block of segments
        kk = k0 + offs_p
        prefix += _sum(tl.load(e_base + kk, mask=kk < start, other=0), axis=0)
    offs = start + tl.arange(0, BLOCK_S)
    ok = offs < R
    ln = tl.load(e_base + offs, mask=ok, other=0)
    excl = _cumsum(ln, axis=0) + prefix - ln
    lo = tl.load(LOWS + b * s_lb + h * s_lh + offs, mask=ok, other=0)
    offs_k = tl.arange(0, BLOCK_K)
    p_base = POS + b * s_pb + h * s_ph
    for k0 in range(0, _max(ln, axis=0), BLOCK_K):
        kk = k0 + offs_k
        tl.store(p_base + excl[:, None] + kk[None, :], lo[:, None] + kk[None, :], mask=kk[None, :] < ln[:, None])
    if start + BLOCK_S >= R:  # last block
        tl.store(TOTAL + pid_bh + tl.arange(0, 1), prefix + _sum(ln, axis=0) + tl.full([1], 0, tl.int32))


# ----------------------------------------------------------------------------------------------- host side


def _blocks(nq: int, precision: str) -> dict:
    if nq <= 16:  # decode: row-wise fp32 scores
        return dict(BLOCK_Q=max(2, triton.next_power_of_2(nq)), BLOCK_C=16 if _interpret() else 64, BLOCK_P=64,
                    ROWWISE=True, num_warps=4)
    if _interpret():
        return dict(BLOCK_Q=16, BLOCK_C=16, BLOCK_P=16, ROWWISE=False, num_warps=4)
    return dict(BLOCK_Q=64 if precision != "ieee" else 32, BLOCK_C=64, BLOCK_P=64, ROWWISE=False, num_warps=4)


def _q_chunks(nq: int, cfg: dict) -> int:
    """Query chunks per program grid: prefill spreads its queries over programs (256 queries each)."""
    return 1 if nq <= 256 else triton.cdiv(nq, 256)


class _Level:
    """One level's tensors and launch helpers (fine or coarse)."""

    def __init__(self, q, cent, sizes, scale, precision):
        self.q, self.cent, self.sizes, self.scale, self.precision = q, cent, sizes, scale, precision
        self.b, self.hk, self.nq, self.d = q.shape
        self.nc = cent.shape[1]
        self.cfg = _blocks(self.nq, precision)
        self.nb = triton.cdiv(max(self.nc, 1), self.cfg["BLOCK_C"])
        self.nqc = _q_chunks(self.nq, self.cfg)
        self.q_per = triton.cdiv(self.nq, self.nqc)
        self.grid = (self.nb, self.nqc, self.b * self.hk)
        self.fused = self.nqc == 1 and self.nq <= 64
        self.store_logits = self.cfg["ROWWISE"]

    def _common(self):
        c = self.cfg
        return dict(HEAD_DIM=self.d, BLOCK_D=triton.next_power_of_2(self.d), BLOCK_Q=c["BLOCK_Q"],
                    BLOCK_C=c["BLOCK_C"], PRECISION=self.precision, ROWWISE=c["ROWWISE"], num_warps=c["num_warps"])

    def lse(self, mode=0, keepc=None, coff=None):
        """Partial log-normalisers [B, Hk, NB, Q], the allowed mask [B, Hk, C] uint8 (mode 1) and the
        logits scratch [B, Hk, Q, C] (few queries; entries of unselected clusters unwritten)."""
        q, cent, dev = self.q, self.cent, self.q.device
        part = torch.empty(self.b, self.hk, self.nb, self.nq, dtype=torch.float32, device=dev)
        allowed = torch.empty(self.b, self.hk, self.nc, dtype=torch.uint8, device=dev) if mode == 1 else part
        store = self.store_logits and mode != 2
        logits = torch.empty(self.b, self.hk, self.nq, self.nc, dtype=torch.float32, device=dev) if store else part
        keepc = keepc if keepc is not None else part
        coff = coff if coff is not None else self.sizes
        ncc = coff.shape[1] - 1 if mode == 1 else 1
        _lse_kernel[self.grid](
            q, cent, self.sizes, keepc, coff, allowed, part, logits,
            q.stride(0), q.stride(1), q.stride(2), cent.stride(0), cent.stride(1), self.sizes.stride(0),
            keepc.stride(0), keepc.stride(1), coff.stride(0), allowed.stride(0), allowed.stride(1),
            part.stride(0), part.stride(1), part.stride(2), logits.stride(0), logits.stride(1), logits.stride(2),
            self.hk, self.nq, self.nc, ncc, self.q_per, self.scale,
            MODE=mode, STORE_LOGITS=store, LOG_CC=max(ncc.bit_length(), 1) + 1, **self._common(),
        )
        return part, (allowed if mode == 1 else None), (logits if store else None)

    def probs(self, parts, allowed=None, thr=None, write_dropped=False, seglen=None, sink=0, window=0, logits=None):
        """Per-key probabilities [B, Hk, C] float32, and with ``thr`` keep [B, Hk, C] uint8 (plus the dropped
        clusters' partial log-normalisers when ``write_dropped``). ``parts``: partial log-normalisers
        ([B, Hk, NB, Q] each) whose logsumexp is log Z."""
        q, cent, dev = self.q, self.cent, self.q.device
        part1 = parts[0]
        part2 = parts[1] if len(parts) > 1 else None
        if self.fused:
            logz = part1
        else:
            logz = torch.logsumexp(part1, dim=2)
            if part2 is not None:
                logz = torch.logaddexp(logz, torch.logsumexp(part2, dim=2))
        p2 = part2 if part2 is not None else part1
        finish = self.nqc == 1
        psum = torch.empty(self.b, self.hk, self.nqc, self.nc, dtype=torch.float32, device=dev)
        decide = finish and thr is not None
        keep = torch.empty(self.b, self.hk, self.nc, dtype=torch.uint8, device=dev) if decide else None
        dpart = (torch.empty(self.b, self.hk, self.nb, self.nq, dtype=torch.float32, device=dev)
                 if write_dropped and decide else psum)
        alw = allowed if allowed is not None else psum
        seg = seglen if seglen is not None and decide else psum
        lg = logits if logits is not None else psum
        kp = keep if keep is not None else psum
        _prob_kernel[self.grid](
            q, cent, self.sizes, alw, logz, part1, p2, thr if thr is not None else psum, psum, kp, dpart, seg, lg,
            q.stride(0), q.stride(1), q.stride(2), cent.stride(0), cent.stride(1), self.sizes.stride(0),
            alw.stride(0), alw.stride(1), logz.stride(0), logz.stride(1),
            part1.stride(0), part1.stride(1), part1.stride(2), p2.stride(0), p2.stride(1), p2.stride(2),
            psum.stride(0), psum.stride(1), psum.stride(2), kp.stride(0), kp.stride(1),
            dpart.stride(0), dpart.stride(1), dpart.stride(2), seg.stride(0), seg.stride(1),
            lg.stride(0), lg.stride(1), lg.stride(2),
            self.hk, self.nq, self.nc, part1.shape[2], p2.shape[2], self.q_per, self.scale, sink, window,
            HAS_ALLOWED=allowed is not None, FUSED=self.fused, HAS_PART2=part2 is not None and self.fused,
            FINISH=finish, DECIDE=decide, WRITE_DROPPED=write_dropped and decide, WRITE_SEGLEN=seglen is not None and decide,
            LOAD_LOGITS=logits is not None, BLOCK_P=self.cfg["BLOCK_P"], **self._common(),
        )
        if finish:
            probs = psum[:, :, 0]
        else:
            probs = psum.sum(dim=2) / self.nq
        if thr is not None and not decide:  # many queries: decide here
            sel = allowed.bool() if allowed is not None else torch.ones_like(probs, dtype=torch.bool)
            keep = (sel & (probs >= thr.view(1, -1, 1))).to(torch.uint8)
        return probs, keep, (dpart if write_dropped and decide else None)

    def coarse_decode(self, thr, coff):
        """The coarse level in one kernel (few queries, threshold mode): probs, keep, extra [B, Hk, 1, Q], read."""
        q, cent, dev = self.q, self.cent, self.q.device
        probs = torch.empty(self.b, self.hk, self.nc, dtype=torch.float32, device=dev)
        keep = torch.empty(self.b, self.hk, self.nc, dtype=torch.uint8, device=dev)
        extra = torch.empty(self.b, self.hk, 1, self.nq, dtype=torch.float32, device=dev)
        read = torch.empty(self.b, self.hk, dtype=torch.int64, device=dev)
        logits = torch.empty(self.b, self.hk, self.nq, self.nc, dtype=torch.float32, device=dev)
        _coarse_decode_kernel[(self.b * self.hk,)](
            q, cent, self.sizes, coff, thr, probs, keep, extra, read, logits,
            q.stride(0), q.stride(1), q.stride(2), cent.stride(0), cent.stride(1), self.sizes.stride(0),
            coff.stride(0), probs.stride(0), probs.stride(1), extra.stride(0), extra.stride(1),
            logits.stride(0), logits.stride(1), logits.stride(2),
            self.hk, self.nq, self.nc, self.scale,
            HEAD_DIM=self.d, BLOCK_D=triton.next_power_of_2(self.d), BLOCK_Q=self.cfg["BLOCK_Q"],
            BLOCK_C=self.cfg["BLOCK_C"], num_warps=4 if self.d <= 64 else 8,
        )
        return probs, keep, extra, read


def _check_args(fine_threshold, budget, coarse_threshold, coarse_budget, hierarchical, precision):
    if (fine_threshold is None) == (budget is None):
        raise ValueError("give exactly one of fine_threshold and budget")
    if hierarchical and fine_threshold is not None and coarse_threshold is None:
        raise ValueError("threshold mode with hierarchical=True needs coarse_threshold")
    if hierarchical and budget is not None and coarse_budget is None:
        raise ValueError("budget mode with hierarchical=True needs coarse_budget")
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32'; got {precision!r}")


def _run(q, fine_centroids, fine_sizes, coarse_centroids, coarse_sizes, coarse_offsets, fine_threshold,
         coarse_threshold, budget, coarse_budget, scale, hierarchical, precision, seglen=None, sink=0, window=0):
    """The whole lookup. Returns keep [B, Hk, Cf] bool, read [B, Hk] int64, fine and coarse probabilities.
    With ``seglen`` [B, Hk, Cf + 2] int32 it also writes the kept length of every segment there."""
    _check_args(fine_threshold, budget, coarse_threshold, coarse_budget, hierarchical, precision)
    q = q if q.stride(-1) == 1 else q.contiguous()
    b, hk, nq, _ = q.shape
    cf = fine_centroids.shape[1]
    fine = _Level(q, fine_centroids, fine_sizes, scale, precision)
    thr = fine_threshold.float().contiguous() if fine_threshold is not None else None
    coarse_probs = allowed = read = None
    seg = dict(seglen=seglen, sink=sink, window=window)
    if not hierarchical:
        part, _, logits = fine.lse()
        probs, keep, _ = fine.probs([part], thr=thr, logits=logits, **seg)
        read = torch.full((b, hk), cf, dtype=torch.int64, device=q.device)
    else:
        coarse = _Level(q, coarse_centroids, coarse_sizes, scale, precision)
        cthr = coarse_threshold.float().contiguous() if coarse_threshold is not None else None
        if thr is not None and coarse.cfg["ROWWISE"]:
            coarse_probs, keep_c, dpart, read = coarse.coarse_decode(cthr, coarse_offsets)
        elif thr is not None:
            part_c, _, logits_c = coarse.lse()
            coarse_probs, keep_c, dpart = coarse.probs([part_c], thr=cthr, write_dropped=True, logits=None)
            if dpart is None:  # many queries: the dropped clusters' terms in a separate pass
                dpart, _, _ = coarse.lse(mode=2, keepc=keep_c)
        else:
            part_c, _, logits_c = coarse.lse()
            coarse_probs, _, _ = coarse.probs([part_c], logits=logits_c)
            allowed_c = torch.ones(b, hk, coarse.nc, dtype=torch.bool, device=q.device)
            keep_c = _budget_mask(coarse_probs, coarse_sizes, allowed_c, coarse_budget).to(torch.uint8)
            dpart, _, _ = coarse.lse(mode=2, keepc=keep_c)
        part_f, allowed, logits = fine.lse(mode=1, keepc=keep_c, coff=coarse_offsets)
        probs, keep, _ = fine.probs([part_f, dpart], allowed=allowed, thr=thr, logits=logits, **seg)
        if read is None:
            read = allowed.sum(-1) + coarse.nc
    if thr is None:
        allowed_b = allowed.view(torch.bool) if allowed is not None else torch.ones_like(probs, dtype=torch.bool)
        keep = _budget_mask(probs, fine_sizes, allowed_b, budget)
    else:
        keep = keep.view(torch.bool)
    if seglen is not None and (thr is None or fine.nqc > 1):
        seglen[..., 1:-1] = torch.where(keep, fine_sizes.unsqueeze(0), 0)
        seglen[..., 0], seglen[..., -1] = sink, window
    return keep, read.to(torch.int64), probs, coarse_probs


LOOKUP_DOC_ARGS = """
    Args:
        q: [B, Hk, Q, D] grouped queries (``group_queries_ref``), any float dtype.
        fine_centroids: [Hk, Cf, D] any float dtype; fine_sizes: [Hk, Cf] int64 (keys per cluster, >= 1).
        coarse_centroids: [Hk, Cc, D]; coarse_sizes: [Hk, Cc] int64; coarse_offsets: [Hk, Cc + 1] int64.
        fine_threshold / coarse_threshold: [Hk] float32 per-key probability thresholds (threshold mode), or None.
        budget / coarse_budget: [B, Hk] float32 keys to keep per level (budget mode), or None.
        scale: softmax scale; hierarchical: False for a flat lookup over every fine centroid.
        precision: "ieee" (exact fp32 scores, default) or "tf32" (faster when Q > 16; decisions may differ
            from the reference for clusters within about 1e-3 of the threshold).
"""


def centroid_lookup(
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
    precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which fine clusters to keep, by coarse-then-fine centroid lookup (Triton; same arguments and results
    as ``centroid_lookup_ref``).

    Returns:
        keep [B, Hk, Cf] bool, centroids_read [B, Hk] int64.
    """
    keep, read, _, _ = _run(q, fine_centroids, fine_sizes, coarse_centroids, coarse_sizes, coarse_offsets,
                            fine_threshold, coarse_threshold, budget, coarse_budget, scale, hierarchical, precision)
    return keep, read


centroid_lookup.__doc__ += LOOKUP_DOC_ARGS


def centroid_probs(*args, precision: str = "ieee", **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same arguments as ``centroid_lookup``; returns the fine per-key probabilities [B, Hk, Cf] (0 outside
    kept coarse clusters) and the coarse ones [B, Hk, Cc] (None when flat). For tests and calibration."""
    names = ("q", "fine_centroids", "fine_sizes", "coarse_centroids", "coarse_sizes", "coarse_offsets",
             "fine_threshold", "coarse_threshold", "budget", "coarse_budget", "scale", "hierarchical")
    bound = dict(zip(names, args), **kwargs)
    bound.setdefault("hierarchical", True)
    _, _, probs, coarse_probs = _run(**bound, precision=precision)
    return probs, coarse_probs


def kept_positions(seglen: torch.Tensor, seg_lows: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment lengths -> sorted positions of the kept keys, without a host sync.

    Args:
        seglen: [B, Hk, R] int32 kept length of every segment (0 for dropped ones), in sorted order.
        seg_lows: [B or 1, Hk, R] or [Hk, R] int32 first sorted position of each segment.
        num_tokens: N, the bound on kept keys per head.
    Returns:
        pos [B, Hk, N] int32 (entries past total unwritten), total [B, Hk] int32 kept keys per head.
    """
    return _positions(seglen, seg_lows, num_tokens)


def _positions(seglen, seg_lows, num_tokens):
    b, hk, r = seglen.shape
    lows = seg_lows if seg_lows.dim() == 3 else seg_lows.unsqueeze(0)
    dev = seglen.device
    pos = torch.empty(b, hk, max(num_tokens, 1), dtype=torch.int32, device=dev)
    total = torch.empty(b, hk, dtype=torch.int32, device=dev)
    block_s = 64 if _interpret() else 256
    _positions_kernel[(triton.cdiv(r, block_s), b * hk)](
        seglen, lows, pos, total,
        seglen.stride(0), seglen.stride(1), lows.stride(0) if lows.shape[0] == b else 0, lows.stride(1),
        pos.stride(0), pos.stride(1),
        hk, r, BLOCK_S=block_s, BLOCK_P=1024, BLOCK_K=16, num_warps=4,
    )
    return pos, total


def centroid_lookup_positions(
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
    fine_offsets: torch.Tensor | None = None,
    seg_lows: torch.Tensor | None = None,
    num_tokens: int,
    sink_tokens: int,
    window_tokens: int,
    precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``centroid_lookup`` plus the sorted positions of every kept key (sinks, kept clusters, window) for
    ``sparse_attention.sparse_attention_positions``: no host sync, CUDA-graph capturable.

    Extra args: fine_offsets [Hk, Cf + 1] int64, or seg_lows [Hk, Cf + 2] int32 from
    ``sparse_attention.segment_lows`` (precompute it once per layer); num_tokens N; sink_tokens; window_tokens.
    Returns:
        keep [B, Hk, Cf] bool, centroids_read [B, Hk] int64, pos [B, Hk, N] int32, total [B, Hk] int32.
    """
    if seg_lows is None:
        if fine_offsets is None:
            raise ValueError("give fine_offsets or seg_lows")
        seg_lows = segment_lows(fine_offsets, num_tokens, window_tokens)
    b, hk = q.shape[:2]
    seglen = torch.empty(b, hk, fine_centroids.shape[1] + 2, dtype=torch.int32, device=q.device)
    keep, read, _, _ = _run(q, fine_centroids, fine_sizes, coarse_centroids, coarse_sizes, coarse_offsets,
                            fine_threshold, coarse_threshold, budget, coarse_budget, scale, hierarchical,
                            precision, seglen=seglen, sink=sink_tokens, window=window_tokens)
    pos, total = _positions(seglen, seg_lows, num_tokens)
    return keep, read, pos, total


centroid_lookup_positions.__doc__ += LOOKUP_DOC_ARGS
