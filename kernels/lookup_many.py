"""Centroid lookup for many queries per KV head (prefill: a question block; same contract as
``centroid_lookup_ref``). ``lookup.py`` routes every call with more than 16 grouped queries here.

With thousands of queries the lookup is matrix multiplication, so it is tiled like FlashAttention and every
tensor-core tile is full: query tiles of ``BLOCK_Q`` rows against centroid tiles of ``BLOCK_C`` rows.

``_normaliser_kernel``  query-stationary: a program holds one query tile and walks a list of centroids with an
                        online log-sum-exp, so ``log Z_q`` comes out of one launch with no partials to merge. It
                        can start from a fixed term, add the always-attended keys (sinks, window) and the dropped
                        coarse clusters of a hierarchical lookup before the fine ones.
``_probs_kernel``       centroid-stationary: a program holds one centroid tile and sums exp(logit - log Z_q) over
                        the queries (of its query split), so the per-key probabilities need no atomics.
The compaction of a hierarchical lookup's fine level into index lists and the threshold decisions are in
``compaction.py``.

The normaliser and probability launches work in base 2 (1.4426950408889634 = log2 e, 0.6931471805599453 =
ln 2): the softmax scale, log-sizes, the variance term and -log Z fold into one fused multiply-add per pair.

Nothing reads a device value on the host (the fine grids are sized by the clusters that could be kept).
Like the other kernels, these avoid Triton's jit-decorated library (tl.zeros, tl.cdiv, tl.sum, ...), which the
interpreter cannot run when Triton was imported before TRITON_INTERPRET was set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .budget import budget_mask
from .chain import chain_enter, chain_launch
from .compaction import compact_fine, threshold_decide
from .lookup_tiles import _always_state, _finish_lse, _load_cent, _load_q, _logaddexp, _qnorm2, _scores
from .sparse_attention import _interpret, _max, _sum

__all__ = ["many_query_lookup", "TUNING_MANY"]

# Launch settings of the many-query path (an H100 sweep in benchmarks/ sets them): query rows per normaliser
# program and centroids per tile; centroids per probability program and query rows per tile; warps; the
# probability launch splits the queries until it has at least ``prob_programs`` programs (counting every
# block a compacted fine level could have).
TUNING_MANY = {"norm_block_q": 64, "norm_block_c": 128, "norm_warps": 4, "norm_stages": 3, "norm_splits": 1,
               "prob_block_c": 64, "prob_block_q": 64, "prob_warps": 4, "prob_stages": 3, "prob_programs": 264}
# (H100 sweep at 128K, 512 question tokens, Llama-3-8B and Llama-2-7B shapes: docs/bench/session6/). The
# normaliser may split each head's centroid list over ``norm_splits`` programs per query tile; the partial
# log-normalisers are merged where they are read.


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _listed_centroids(C, IDX, offs, sel, offs_d, d_ok, s_cc, GATHER: tl.constexpr, NATIVE: tl.constexpr):
    """Centroid ids at list slots ``offs`` (IDX points at this head's list with GATHER, else slot = id) and
    their rows [BLOCK_C, BLOCK_D] (C points at this head's table; zeros where not ``sel``)."""
    if GATHER:
        cid = tl.load(IDX + offs, mask=sel, other=0)
    else:
        cid = offs
    return cid, _load_cent(C, s_cc, cid, sel, offs_d, d_ok, NATIVE)


@triton.jit
def _terms_log2(qv, var_q, cent, cid, sel, SIZES, SPREAD, scale2, NATIVE: tl.constexpr,
                PRECISION: tl.constexpr, HAS_SPREAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    """Normaliser terms in base 2, (log(n_c) + l_qc) / ln 2 [BLOCK_Q, BLOCK_C], -inf where not ``sel``
    (through the per-centroid bias, so no per-pair select); ``scale2`` = s / ln 2, ``var_q`` = s^2 |q|^2 / (2 ln 2)
    (the variance term's query factor); SIZES / SPREAD point at this head's rows. Per pair that is the dot,
    two fused multiply-adds and nothing else: these launches are ALU-bound on the H100."""
    bias = tl.where(sel, tl.log2(tl.load(SIZES + cid, mask=sel, other=1).to(tl.float32)), float("-inf"))
    if HAS_SPREAD:
        v = tl.load(SPREAD + cid, mask=sel, other=0.0).to(tl.float32)
        extra = var_q[:, None] * v[None, :] + bias[None, :]
    else:
        extra = bias[None, :]
    return _scores(qv, cent, scale2, BLOCK_Q, BLOCK_C, False, NATIVE, PRECISION) + extra


@triton.jit
def _online_log2(m, s, t):
    """``_online`` in base 2: running (max m in log2 units, sum s) [BLOCK_Q] over 2^t, t [BLOCK_Q, BLOCK_C]
    (-inf: none)."""
    m_new = tl.maximum(m, _max(t, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp2(m - m_safe) + _sum(tl.exp2(t - m_safe[:, None]), axis=1)


@triton.jit
def _normaliser_kernel(
    Q, C, SIZES, SPREAD, IDX, COUNT, CC, CSIZES, CSPREAD, KEEPC, K, FIXED, LOGZ, LOGZ_ALWAYS,
    s_qb, s_qh, s_qm, s_ch, s_cc, s_sh, s_vh, s_ib, s_ih, s_nb, s_nh,
    s_cch, s_ccc, s_csh, s_cvh, s_kb, s_kh, s_akh, s_akn, s_fb, s_fh, s_zb, s_zh, s_zs, s_ab, s_ah,
    HK, NQ, NC, NCC, N, SINK, WINDOW, NSPLIT, scale, half_s2,
    GATHER: tl.constexpr,  # the centroids are IDX[b, h, :COUNT[b, h]], else all NC of them
    DROPPED: tl.constexpr,  # first the coarse clusters CC with KEEPC == 0
    ALWAYS: tl.constexpr,  # first the always-attended keys K; their own log-sum-exp goes to LOGZ_ALWAYS
    HAS_FIXED: tl.constexpr, HAS_SPREAD: tl.constexpr, HAS_CSPREAD: tl.constexpr,
    NATIVE: tl.constexpr, PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    """LOGZ[b, h, s, q] = log(exp(FIXED) + always + sum over dropped coarse and listed centroids of
    n_c exp(l_qc)), the centroids split in NSPLIT equal chunks (split s = 0 also takes the first three terms)."""
    chain_enter(PDL)
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_cb = tl.arange(0, BLOCK_C)
    q0 = pid_q * BLOCK_Q
    offs_q = q0 + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < NQ
    qv = _load_q(Q + b * s_qb + h * s_qh, s_qm, q0, NQ, offs_d, d_ok, BLOCK_Q, NATIVE)
    var_q = _qnorm2(qv) * half_s2 * 1.4426950408889634
    scale2 = scale * 1.4426950408889634
    # the running state is in base 2: m in log2 units, s relative to 2^m
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    s = tl.full([BLOCK_Q], 0.0, tl.float32)
    first = pid_s == 0
    if HAS_FIXED:
        if first:
            m = tl.load(FIXED + b * s_fb + h * s_fh + offs_q, mask=q_ok, other=float("-inf")) * 1.4426950408889634
            s = tl.where(m == float("-inf"), 0.0, 1.0)
    if ALWAYS:
        if first:
            m, s = _always_state(qv, K + h * s_akh, s_akn, N, SINK, WINDOW, scale, offs_d, d_ok, BLOCK_Q, BLOCK_C,
                                 False, NATIVE, PRECISION)
            tl.store(LOGZ_ALWAYS + b * s_ab + h * s_ah + offs_q, _finish_lse(m, s), mask=q_ok)
            m = m * 1.4426950408889634  # (natural-log state -> base 2; s is unchanged)
    if DROPPED:
        for c0 in range(0, NCC * first.to(tl.int32), BLOCK_C):
            offs_c = c0 + offs_cb
            sel = offs_c < NCC
            sel = sel & (tl.load(KEEPC + b * s_kb + h * s_kh + offs_c, mask=sel, other=1) == 0)
            cent = _load_cent(CC + h * s_cch, s_ccc, offs_c, sel, offs_d, d_ok, NATIVE)
            t = _terms_log2(qv, var_q, cent, offs_c, sel, CSIZES + h * s_csh, CSPREAD + h * s_cvh, scale2, NATIVE,
                            PRECISION, HAS_CSPREAD, BLOCK_Q, BLOCK_C)
            m, s = _online_log2(m, s, t)
    if GATHER:
        n = tl.load(COUNT + b * s_nb + h * s_nh)
    else:
        n = NC
    chunk = ((n + NSPLIT - 1) // NSPLIT + BLOCK_C - 1) // BLOCK_C * BLOCK_C
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, n)
    for c0 in range(lo, hi, BLOCK_C):
        offs = c0 + offs_cb
        sel = offs < hi
        cid, cent = _listed_centroids(C + h * s_ch, IDX + b * s_ib + h * s_ih, offs, sel, offs_d, d_ok, s_cc,
                                      GATHER, NATIVE)
        t = _terms_log2(qv, var_q, cent, cid, sel, SIZES + h * s_sh, SPREAD + h * s_vh, scale2, NATIVE, PRECISION,
                        HAS_SPREAD, BLOCK_Q, BLOCK_C)
        m, s = _online_log2(m, s, t)
    logz = (tl.where(m == float("-inf"), 0.0, m) + tl.log2(s)) * 0.6931471805599453
    tl.store(LOGZ + b * s_zb + h * s_zh + pid_s * s_zs + offs_q, logz, mask=q_ok)


@triton.jit
def _probs_kernel(
    Q, C, SPREAD, IDX, COUNT, LOGZ, OUT,
    s_qb, s_qh, s_qm, s_ch, s_cc, s_vh, s_ib, s_ih, s_nb, s_nh, s_zb, s_zh, s_zs, s_ob, s_oh, s_os,
    HK, NQ, NC, NZ, Q_PER_SPLIT, scale, half_s2, inv_nq,
    GATHER: tl.constexpr, HAS_SPREAD: tl.constexpr, NATIVE: tl.constexpr, PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    """OUT[b, h, split, c] = sum over the split's queries of exp(l_qc - log Z_q) / NQ for the program's
    centroids c (listed in IDX with GATHER; untouched entries keep their value); log Z_q is the logsumexp of
    the NZ partial rows LOGZ[b, h, :, q]."""
    chain_enter(PDL)
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    if GATHER:
        n = tl.load(COUNT + b * s_nb + h * s_nh)
    else:
        n = NC
    c0 = pid_c * BLOCK_C
    if c0 < n:
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        offs = c0 + tl.arange(0, BLOCK_C)
        sel = offs < n
        cid, cent = _listed_centroids(C + h * s_ch, IDX + b * s_ib + h * s_ih, offs, sel, offs_d, d_ok, s_cc,
                                      GATHER, NATIVE)
        scale2 = scale * 1.4426950408889634
        if HAS_SPREAD:
            v = tl.load(SPREAD + h * s_vh + cid, mask=sel, other=0.0).to(tl.float32)
        q_lo = pid_s * Q_PER_SPLIT
        q_hi = tl.minimum(q_lo + Q_PER_SPLIT, NQ)
        acc = tl.full([BLOCK_Q, BLOCK_C], 0.0, tl.float32)  # summed over the query rows once, at the end
        for q0 in range(q_lo, q_hi, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            q_ok = offs_q < q_hi
            qv = _load_q(Q + b * s_qb + h * s_qh, s_qm, q0, q_hi, offs_d, d_ok, BLOCK_Q, NATIVE)
            logz = tl.load(LOGZ + b * s_zb + h * s_zh + offs_q, mask=q_ok, other=0.0)
            for k in range(1, NZ):
                logz = _logaddexp(logz, tl.load(LOGZ + b * s_zb + h * s_zh + k * s_zs + offs_q, mask=q_ok,
                                                other=0.0))
            # base 2, -log Z folded into the bias: the dot, two fused multiply-adds and one exp2 per pair. Rows
            # past the split get 2^-inf = 0; columns of unselected centroids are never stored.
            neg_log2z = tl.where(q_ok, -logz * 1.4426950408889634, float("-inf"))
            if HAS_SPREAD:
                extra = (_qnorm2(qv) * half_s2 * 1.4426950408889634)[:, None] * v[None, :] + neg_log2z[:, None]
            else:
                extra = neg_log2z[:, None]
            acc += tl.exp2(_scores(qv, cent, scale2, BLOCK_Q, BLOCK_C, False, NATIVE, PRECISION) + extra)
        tl.store(OUT + b * s_ob + h * s_oh + pid_s * s_os + cid, _sum(acc, axis=0) * inv_nq, mask=sel)


# ----------------------------------------------------------------------------------------------- host side


class _Table:
    """One level's centroids [Hk, C, D], sizes [Hk, C] and optional spreads [Hk, C] (float32)."""

    def __init__(self, cent, sizes, spread):
        self.cent = cent if cent.stride(-1) == 1 else cent.contiguous()
        self.sizes, self.nc = sizes, cent.shape[1]
        self.spread = spread.float().contiguous() if spread is not None else None


class _Many:
    """Launch helpers for queries q [B, Hk, NQ, D] (NQ large)."""

    def __init__(self, q, scale, precision):
        self.q, self.scale, self.precision = q, scale, precision
        self.b, self.hk, self.nq, self.d = q.shape
        self.dev = q.device

    def _native(self, table):
        sixteen = self.q.dtype in (torch.bfloat16, torch.float16) and table.cent.dtype == self.q.dtype
        return sixteen and not _interpret()

    def _launch_cfg(self, kind):
        t = TUNING_MANY
        if _interpret():
            return dict(BLOCK_Q=16, BLOCK_C=16, num_warps=4, num_stages=1)
        return dict(BLOCK_Q=t[f"{kind}_block_q"], BLOCK_C=t[f"{kind}_block_c"], num_warps=t[f"{kind}_warps"],
                    num_stages=t[f"{kind}_stages"])

    def normaliser(self, table, idx=None, count=None, fixed=None, always=None, dropped=None):
        """log Z as partial rows [B, Hk, S, NQ] (logsumexp over S) over ``table``'s centroids (those in
        ``idx[:, :, :count]`` when given), plus exp(``fixed``), the always-attended keys ``always`` = (keys, sink,
        window) and the coarse clusters
        ``dropped`` = (coarse table, keep_c) with keep_c == 0. With ``always`` also returns their own
        log-normaliser (else None)."""
        q, dev = self.q, self.dev
        splits = 2 if _interpret() else TUNING_MANY["norm_splits"]  # (the interpreter checks the split path)
        logz = torch.empty(self.b, self.hk, splits, self.nq, dtype=torch.float32, device=dev)
        logz_always = torch.empty(self.b, self.hk, self.nq, dtype=torch.float32, device=dev)
        keys, sink, window = always if always is not None else (table.cent, 0, 0)
        keys = keys if keys.stride(-1) == 1 else keys.contiguous()
        n = keys.shape[1]
        sink = min(sink, n)
        window = min(window, n - sink)
        dummy = logz_always
        ctab, keepc = dropped if dropped is not None else (table, dummy)
        idx_t = idx if idx is not None else dummy
        cnt = count if count is not None else dummy
        fx = fixed.float().contiguous() if fixed is not None else dummy
        sp = table.spread if table.spread is not None else dummy
        csp = ctab.spread if ctab.spread is not None else dummy
        cfg = self._launch_cfg("norm")
        grid = (triton.cdiv(self.nq, cfg["BLOCK_Q"]), splits, self.b * self.hk)
        _normaliser_kernel[grid](
            q, table.cent, table.sizes, sp, idx_t, cnt, ctab.cent, ctab.sizes, csp, keepc, keys, fx, logz,
            logz_always,
            q.stride(0), q.stride(1), q.stride(2), table.cent.stride(0), table.cent.stride(1),
            table.sizes.stride(0), sp.stride(0), idx_t.stride(0), idx_t.stride(1), cnt.stride(0), cnt.stride(-1),
            ctab.cent.stride(0), ctab.cent.stride(1), ctab.sizes.stride(0), csp.stride(0), keepc.stride(0),
            keepc.stride(1), keys.stride(0), keys.stride(1), fx.stride(0), fx.stride(1), logz.stride(0),
            logz.stride(1), logz.stride(2), logz_always.stride(0), logz_always.stride(1),
            self.hk, self.nq, table.nc, ctab.nc, n, sink, window, splits, self.scale, 0.5 * self.scale * self.scale,
            GATHER=idx is not None, DROPPED=dropped is not None, ALWAYS=always is not None,
            HAS_FIXED=fixed is not None, HAS_SPREAD=table.spread is not None, HAS_CSPREAD=ctab.spread is not None,
            NATIVE=self._native(table), PRECISION=self.precision, HEAD_DIM=self.d,
            BLOCK_D=triton.next_power_of_2(self.d), **cfg, **chain_launch(q.device),
        )
        return logz, (logz_always if always is not None else None)

    def probs(self, table, logz, idx=None, count=None, out=None):
        """Per-key probabilities [B, Hk, C] (mean over queries of exp(l_qc - log Z_q)); with ``idx`` only the
        listed centroids are written into ``out`` (whose other entries must already hold 0)."""
        q, dev = self.q, self.dev
        cfg = self._launch_cfg("prob")
        nblocks = triton.cdiv(table.nc, cfg["BLOCK_C"])
        want = TUNING_MANY["prob_programs"] if not _interpret() else 2 * nblocks * self.b * self.hk
        # (the interpreter takes 2 splits where the queries allow, so the CPU tests cover the split buffers)
        splits = max(1, min(triton.cdiv(want, nblocks * self.b * self.hk), triton.cdiv(self.nq, cfg["BLOCK_Q"])))
        if splits == 1:
            res = out if out is not None else torch.empty(self.b, self.hk, table.nc, dtype=torch.float32, device=dev)
            dst = res.unsqueeze(2)
        else:
            # listed centroids only (idx): the others' partials must read 0; else every entry is written
            alloc = torch.zeros if idx is not None else torch.empty
            dst = alloc(self.b, self.hk, splits, table.nc, dtype=torch.float32, device=dev)
        q_per = triton.cdiv(triton.cdiv(self.nq, splits), cfg["BLOCK_Q"]) * cfg["BLOCK_Q"]
        idx_t = idx if idx is not None else logz
        cnt = count if count is not None else logz
        sp = table.spread if table.spread is not None else logz
        _probs_kernel[(nblocks, splits, self.b * self.hk)](
            q, table.cent, sp, idx_t, cnt, logz, dst,
            q.stride(0), q.stride(1), q.stride(2), table.cent.stride(0), table.cent.stride(1), sp.stride(0),
            idx_t.stride(0), idx_t.stride(1), cnt.stride(0), cnt.stride(-1), logz.stride(0), logz.stride(1),
            logz.stride(2), dst.stride(0), dst.stride(1), dst.stride(2),
            self.hk, self.nq, table.nc, logz.shape[2], q_per, self.scale, 0.5 * self.scale * self.scale, 1.0 / self.nq,
            GATHER=idx is not None, HAS_SPREAD=table.spread is not None, NATIVE=self._native(table),
            PRECISION=self.precision, HEAD_DIM=self.d, BLOCK_D=triton.next_power_of_2(self.d), **cfg,
            **chain_launch(q.device),
        )
        if splits == 1:
            return res
        total = dst.sum(dim=2)
        if out is None:
            return total
        return out.copy_(total)


def many_query_lookup(q, fine_centroids, fine_sizes, coarse_centroids, coarse_sizes, coarse_offsets, fine_threshold,
                      coarse_threshold, budget, coarse_budget, scale, hierarchical, precision, *, seglen=None, sink=0,
                      window=0, fine_spread=None, coarse_spread=None, fixed_logz=None, always_keys=None, excl=None,
                      budget_slack=0.0):
    """``lookup._run`` for many queries: keep [B, Hk, Cf] bool, allowed [B, Hk, Cf] uint8 (None when flat), the
    fine and the coarse probabilities. ``seglen`` / ``excl``: as ``_run`` writes them."""
    many = _Many(q, scale, precision)
    fine = _Table(fine_centroids, fine_sizes, fine_spread)
    allowed = coarse_probs = None
    if not hierarchical:
        logz, _ = many.normaliser(fine, fixed=fixed_logz, always=always_keys)
        probs = many.probs(fine, logz)
    else:
        coarse = _Table(coarse_centroids, coarse_sizes, coarse_spread)
        logz_c, logz_always = many.normaliser(coarse, fixed=fixed_logz, always=always_keys)
        fixed = logz_always if always_keys is not None else fixed_logz
        coarse_probs = many.probs(coarse, logz_c)
        if fine_threshold is not None:
            keep_c = threshold_decide(coarse_probs, coarse_threshold).view(torch.uint8)
        else:
            keep_c = budget_mask(coarse_probs, coarse_sizes, None, coarse_budget).view(torch.uint8)
        probs = torch.empty(many.b, many.hk, fine.nc, dtype=torch.float32, device=q.device)
        idx, count, allowed = compact_fine(keep_c, coarse_offsets, fine.nc, probs)
        logz, _ = many.normaliser(fine, idx, count, fixed=fixed, dropped=(coarse, keep_c))
        many.probs(fine, logz, idx, count, out=probs)
    if fine_threshold is None:
        keep = budget_mask(probs, fine_sizes, allowed, budget, seglen=seglen, sink=sink, window=window, excl=excl,
                           slack=budget_slack)
        return keep, allowed, probs, coarse_probs
    keep = threshold_decide(probs, fine_threshold, fine_sizes, allowed, seglen, sink, window)
    return keep, allowed, probs, coarse_probs
