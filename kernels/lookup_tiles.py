"""Triton helpers shared by the centroid lookup kernels (``lookup_kernels.py``, ``lookup_many.py``, ``decide.py``,
``budget.py``): loading query and centroid tiles (with the 8-bit tables' scale fold), their scores, and the
online log-sum-exp steps and merges of partial log-normalisers.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
