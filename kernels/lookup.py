"""Hierarchical centroid lookup in Triton (same contract as ``centroid_lookup_ref``).

Two kernels, each run once per level, grid ``(cluster blocks, B * Hk)``:

``_lse_kernel``   partial log-normalisers: for a block of clusters and every query,
                  ``logsumexp_c(s * q.c + log n_c)`` over the block's *selected* clusters
                  (all; fine clusters under kept coarse parents; dropped coarse clusters).
``_prob_kernel``  reduces the partials to ``log Z_q`` (in-kernel when small, else given), recomputes the
                  logits and averages ``exp(s * q.c - log Z_q)`` over the queries: the per-key probability
                  estimate of each cluster. In threshold mode it decides ``keep`` in-kernel, and at the
                  coarse level it also writes the partial log-normalisers of the dropped clusters (the
                  coarse terms of the hierarchical denominator); at the fine level it can write the
                  kept segment lengths that ``sparse_attention_segments`` consumes.

Budget mode sorts the Triton-computed probabilities with torch (``_budget_mask`` of the reference).
Centroid loads of unselected clusters are masked off, so the fine level reads only the centroids under kept
coarse clusters. Scores use fp32 ``tl.dot`` with ``precision="ieee"`` by default, so keep decisions match the
torch reference except for ties within rounding; ``"tf32"`` is much faster for many queries (prefill).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import _budget_mask
from .sparse_attention import _count_le

__all__ = ["centroid_lookup", "centroid_lookup_segments", "centroid_probs"]

_NEG_INF = float("-inf")


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _reduce_parts(PART, s_pk, nb, offs_q, q_ok, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """logsumexp over the nb partial rows PART[k, q] for the queries offs_q -> [BLOCK_Q]."""
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_Q], tl.float32)
    offs_p = tl.arange(0, BLOCK_P)
    for k0 in range(0, nb, BLOCK_P):
        kk = k0 + offs_p
        v = tl.load(PART + kk[:, None] * s_pk + offs_q[None, :], mask=(kk < nb)[:, None] & q_ok[None, :],
                    other=float("-inf"))
        m_new = tl.maximum(m, tl.max(v, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(v - m_safe[None, :]), axis=0)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe + tl.log(s)  # -inf where every partial is -inf


@triton.jit
def _block_lse(logits, logn, sel):
    """[BLOCK_Q, BLOCK_C] logits -> [BLOCK_Q] logsumexp of logits + log n over the selected clusters."""
    t = tl.where(sel[None, :], logits + logn[None, :], float("-inf"))
    mx = tl.max(t, axis=1)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    return mx_safe + tl.log(tl.sum(tl.exp(t - mx_safe[:, None]), axis=1))


@triton.jit
def _lse_kernel(
    Q, C, SIZES, KEEPC, COFF, ALLOWED, PART,
    s_qb, s_qh, s_qm, s_ch, s_cc, s_sh, s_kb, s_kh, s_oh, s_ab, s_ah, s_pb, s_ph, s_pk,
    HK, NQ, NC, NCC, scale,
    MODE: tl.constexpr,  # 0: all clusters, 1: fine under kept coarse parents (writes ALLOWED), 2: dropped coarse
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
    LOG_CC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
        tl.store(ALLOWED + b * s_ab + h * s_ah + offs_c, sel.to(tl.uint8), mask=c_ok)
    elif MODE == 2:
        kc = tl.load(KEEPC + b * s_kb + h * s_kh + offs_c, mask=c_ok, other=1)
        sel = c_ok & (kc == 0)
    else:
        sel = c_ok
    n_sel = tl.sum(sel.to(tl.int32), axis=0)
    part_base = PART + b * s_pb + h * s_ph + pid_c * s_pk
    offs_qb = tl.arange(0, BLOCK_Q)
    if n_sel > 0:
        logn = tl.log(tl.load(SIZES + h * s_sh + offs_c, mask=sel, other=1).to(tl.float32))
        cent = tl.load(C + h * s_ch + offs_c[:, None] * s_cc + offs_d[None, :],
                       mask=sel[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        for q0 in range(0, NQ, BLOCK_Q):
            offs_q = q0 + offs_qb
            q_ok = offs_q < NQ
            qv = tl.load(Q + b * s_qb + h * s_qh + offs_q[:, None] * s_qm + offs_d[None, :],
                         mask=q_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            logits = tl.dot(qv, tl.trans(cent), input_precision=PRECISION) * scale
            tl.store(part_base + offs_q, _block_lse(logits, logn, sel), mask=q_ok)
    else:
        for q0 in range(0, NQ, BLOCK_Q):
            offs_q = q0 + offs_qb
            tl.store(part_base + offs_q, tl.full([BLOCK_Q], float("-inf"), tl.float32), mask=offs_q < NQ)


@triton.jit
def _prob_kernel(
    Q, C, SIZES, ALLOWED, LOGZ, PART, PART2, THR, PROBS, KEEP, DPART, SEGLEN,
    s_qb, s_qh, s_qm, s_ch, s_cc, s_sh, s_ab, s_ah, s_zb, s_zh,
    s_pb, s_ph, s_pk, s_p2b, s_p2h, s_p2k, s_rb, s_rh, s_db, s_dh, s_dk, s_gb, s_gh,
    HK, NQ, NC, NB1, NB2, scale, sink_len, window_len,
    HAS_ALLOWED: tl.constexpr, FUSED: tl.constexpr, HAS_PART2: tl.constexpr, HAS_THR: tl.constexpr,
    WRITE_DROPPED: tl.constexpr, WRITE_SEGLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
    n_sel = tl.sum(sel.to(tl.int32), axis=0)
    # Dropped coarse clusters still need their logits (for the partial denominator), so load every
    # cluster of the block then; otherwise only the selected ones.
    if WRITE_DROPPED:
        load_ok = c_ok
    else:
        load_ok = sel
    acc = tl.zeros([BLOCK_C], tl.float32)
    cent = tl.load(C + h * s_ch + offs_c[:, None] * s_cc + offs_d[None, :],
                   mask=load_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if n_sel > 0:
        for q0 in range(0, NQ, BLOCK_Q):
            offs_q = q0 + offs_qb
            q_ok = offs_q < NQ
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
            qv = tl.load(Q + b * s_qb + h * s_qh + offs_q[:, None] * s_qm + offs_d[None, :],
                         mask=q_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            logits = tl.dot(qv, tl.trans(cent), input_precision=PRECISION) * scale
            p = tl.exp(logits - logz[:, None])
            p = tl.where(q_ok[:, None] & sel[None, :], p, 0.0)
            acc += tl.sum(p, axis=0)
    probs = acc / NQ
    tl.store(PROBS + b * s_rb + h * s_rh + offs_c, probs, mask=c_ok)
    if HAS_THR:
        keep = sel & (probs >= tl.load(THR + h))
        tl.store(KEEP + b * s_rb + h * s_rh + offs_c, keep.to(tl.uint8), mask=c_ok)
        if WRITE_DROPPED:
            dropped = c_ok & ~keep
            logn = tl.log(tl.load(SIZES + h * s_sh + offs_c, mask=c_ok, other=1).to(tl.float32))
            d_base = DPART + b * s_db + h * s_dh + pid_c * s_dk
            for q0 in range(0, NQ, BLOCK_Q):
                offs_q = q0 + offs_qb
                q_ok = offs_q < NQ
                qv = tl.load(Q + b * s_qb + h * s_qh + offs_q[:, None] * s_qm + offs_d[None, :],
                             mask=q_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                logits = tl.dot(qv, tl.trans(cent), input_precision=PRECISION) * scale
                tl.store(d_base + offs_q, _block_lse(logits, logn, dropped), mask=q_ok)
        if WRITE_SEGLEN:
            size = tl.load(SIZES + h * s_sh + offs_c, mask=c_ok, other=0)
            g_base = SEGLEN + b * s_gb + h * s_gh
            tl.store(g_base + 1 + offs_c, tl.where(keep, size, 0).to(tl.int32), mask=c_ok)
            if pid_c == 0:
                ends = tl.arange(0, 2)
                tl.store(g_base + ends * (NC + 1), tl.where(ends == 0, sink_len, window_len).to(tl.int32))


# ----------------------------------------------------------------------------------------------- host side


def _blocks(nq: int, precision: str) -> dict:
    if _interpret():
        return dict(BLOCK_Q=16, BLOCK_C=16, BLOCK_P=16, num_warps=4)
    if nq <= 16:
        return dict(BLOCK_Q=16, BLOCK_C=64, BLOCK_P=64, num_warps=4)
    return dict(BLOCK_Q=64 if precision != "ieee" else 32, BLOCK_C=64, BLOCK_P=64, num_warps=4)


class _Level:
    """One level's tensors and launch helpers (fine or coarse)."""

    def __init__(self, q, cent, sizes, scale, precision):
        self.q, self.cent, self.sizes, self.scale, self.precision = q, cent, sizes, scale, precision
        self.b, self.hk, self.nq, self.d = q.shape
        self.nc = cent.shape[1]
        self.cfg = _blocks(self.nq, precision)
        self.nb = triton.cdiv(max(self.nc, 1), self.cfg["BLOCK_C"])
        self.grid = (self.nb, self.b * self.hk)
        self.fused = self.nq * self.nb <= 16384 and self.nq <= 64

    def _common(self):
        c = self.cfg
        return dict(HEAD_DIM=self.d, BLOCK_D=triton.next_power_of_2(self.d), BLOCK_Q=c["BLOCK_Q"],
                    BLOCK_C=c["BLOCK_C"], PRECISION=self.precision, num_warps=c["num_warps"])

    def lse(self, mode=0, keepc=None, coff=None):
        """Partial log-normalisers [B, Hk, NB, Q] (and the allowed mask [B, Hk, C] uint8 in mode 1)."""
        q, cent = self.q, self.cent
        part = torch.empty(self.b, self.hk, self.nb, self.nq, dtype=torch.float32, device=q.device)
        allowed = torch.empty(self.b, self.hk, self.nc, dtype=torch.uint8, device=q.device) if mode == 1 else part
        keepc = keepc if keepc is not None else part
        coff = coff if coff is not None else self.sizes
        ncc = coff.shape[1] - 1 if mode == 1 else 1
        _lse_kernel[self.grid](
            q, cent, self.sizes, keepc, coff, allowed, part,
            q.stride(0), q.stride(1), q.stride(2), cent.stride(0), cent.stride(1), self.sizes.stride(0),
            keepc.stride(0), keepc.stride(1), coff.stride(0), allowed.stride(0), allowed.stride(1),
            part.stride(0), part.stride(1), part.stride(2),
            self.hk, self.nq, self.nc, ncc, self.scale,
            MODE=mode, LOG_CC=max(ncc.bit_length(), 1) + 1, **self._common(),
        )
        return part, (allowed if mode == 1 else None)

    def probs(self, parts, allowed=None, thr=None, write_dropped=False, seglen=None, sink=0, window=0):
        """Per-key probabilities [B, Hk, C] float32; with ``thr`` also keep [B, Hk, C] uint8 (and the
        dropped clusters' partial log-normalisers when ``write_dropped``)."""
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
        probs = torch.empty(self.b, self.hk, self.nc, dtype=torch.float32, device=dev)
        keep = torch.empty(self.b, self.hk, self.nc, dtype=torch.uint8, device=dev) if thr is not None else probs
        dpart = (torch.empty(self.b, self.hk, self.nb, self.nq, dtype=torch.float32, device=dev)
                 if write_dropped else probs.unsqueeze(2))
        alw = allowed if allowed is not None else keep
        thr_t = thr if thr is not None else probs
        seg = seglen if seglen is not None else keep
        _prob_kernel[self.grid](
            q, cent, self.sizes, alw, logz, part1, p2, thr_t, probs, keep, dpart, seg,
            q.stride(0), q.stride(1), q.stride(2), cent.stride(0), cent.stride(1), self.sizes.stride(0),
            alw.stride(0), alw.stride(1), logz.stride(0), logz.stride(1),
            part1.stride(0), part1.stride(1), part1.stride(2), p2.stride(0), p2.stride(1), p2.stride(2),
            probs.stride(0), probs.stride(1), dpart.stride(0), dpart.stride(1), dpart.stride(2),
            seg.stride(0), seg.stride(1),
            self.hk, self.nq, self.nc, part1.shape[2], p2.shape[2], self.scale, sink, window,
            HAS_ALLOWED=allowed is not None, FUSED=self.fused, HAS_PART2=part2 is not None and self.fused,
            HAS_THR=thr is not None, WRITE_DROPPED=write_dropped, WRITE_SEGLEN=seglen is not None,
            BLOCK_P=self.cfg["BLOCK_P"], **self._common(),
        )
        return probs, (keep if thr is not None else None), (dpart if write_dropped else None)


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
    """The whole lookup; returns keep [B, Hk, Cf] bool, read [B, Hk] int64 and the fine/coarse probabilities."""
    _check_args(fine_threshold, budget, coarse_threshold, coarse_budget, hierarchical, precision)
    q = q if q.stride(-1) == 1 else q.contiguous()
    b, hk, nq, _ = q.shape
    cf = fine_centroids.shape[1]
    fine = _Level(q, fine_centroids, fine_sizes, scale, precision)
    thr = fine_threshold.float().contiguous() if fine_threshold is not None else None
    coarse_probs = None
    if not hierarchical:
        part, _ = fine.lse()
        probs, keep, _ = fine.probs([part], thr=thr, seglen=seglen, sink=sink, window=window)
        allowed = None
        read = torch.full((b, hk), cf, dtype=torch.int64, device=q.device)
    else:
        coarse = _Level(q, coarse_centroids, coarse_sizes, scale, precision)
        part_c, _ = coarse.lse()
        if thr is not None:
            cthr = coarse_threshold.float().contiguous()
            coarse_probs, keep_c, dpart = coarse.probs([part_c], thr=cthr, write_dropped=True)
        else:
            coarse_probs, _, _ = coarse.probs([part_c])
            allowed_c = torch.ones(b, hk, coarse.nc, dtype=torch.bool, device=q.device)
            keep_c = _budget_mask(coarse_probs, coarse_sizes, allowed_c, coarse_budget).to(torch.uint8)
            dpart, _ = coarse.lse(mode=2, keepc=keep_c)
        part_f, allowed = fine.lse(mode=1, keepc=keep_c, coff=coarse_offsets)
        probs, keep, _ = fine.probs([part_f, dpart], allowed=allowed, thr=thr, seglen=seglen, sink=sink,
                                    window=window)
        read = allowed.sum(-1) + coarse.nc
    if thr is None:
        allowed_b = allowed.view(torch.bool) if allowed is not None else torch.ones_like(probs, dtype=torch.bool)
        keep = _budget_mask(probs, fine_sizes, allowed_b, budget)
        if seglen is not None:
            seglen[..., 1:-1] = torch.where(keep, fine_sizes.unsqueeze(0), 0)
            seglen[..., 0], seglen[..., -1] = sink, window
    else:
        keep = keep.view(torch.bool)
    return keep, read.to(torch.int64), probs, coarse_probs


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
    """Which fine clusters to keep, by coarse-then-fine centroid lookup (Triton; see ``centroid_lookup_ref``,
    same arguments and results).

    Args:
        q: [B, Hk, Q, D] grouped queries, any float dtype; fine_centroids [Hk, Cf, D], fine_sizes [Hk, Cf] int64;
        coarse_centroids [Hk, Cc, D], coarse_sizes [Hk, Cc] int64, coarse_offsets [Hk, Cc + 1] int64;
        fine_threshold / coarse_threshold [Hk] float32 (threshold mode) or budget / coarse_budget [B, Hk]
        float32 keys (budget mode); scale: softmax scale; hierarchical: False for a flat fine lookup.
        precision: "ieee" (exact fp32 scores, default) or "tf32" (faster for many queries).
    Returns:
        keep [B, Hk, Cf] bool, centroids_read [B, Hk] int64.
    """
    keep, read, _, _ = _run(q, fine_centroids, fine_sizes, coarse_centroids, coarse_sizes, coarse_offsets,
                            fine_threshold, coarse_threshold, budget, coarse_budget, scale, hierarchical, precision)
    return keep, read


def centroid_probs(*args, precision: str = "ieee", **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same arguments as ``centroid_lookup``; returns the fine per-key probabilities [B, Hk, Cf] (0 outside
    kept coarse clusters) and the coarse ones [B, Hk, Cc] (None when flat). For tests and diagnostics."""
    names = ("q", "fine_centroids", "fine_sizes", "coarse_centroids", "coarse_sizes", "coarse_offsets",
             "fine_threshold", "coarse_threshold", "budget", "coarse_budget", "scale", "hierarchical")
    bound = dict(zip(names, args), **kwargs)
    bound.setdefault("hierarchical", True)
    _, _, probs, coarse_probs = _run(**bound, precision=precision)
    return probs, coarse_probs


def centroid_lookup_segments(
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
    sink_tokens: int,
    window_tokens: int,
    precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``centroid_lookup`` plus the segment table of ``sparse_attention_segments``, with no host sync.

    Returns:
        keep [B, Hk, Cf] bool, centroids_read [B, Hk] int64,
        seg_cum [B, Hk, Cf + 2] int32: inclusive cumsum of kept lengths of (sinks, fine clusters, window).
    """
    b, hk = q.shape[:2]
    seglen = torch.empty(b, hk, fine_centroids.shape[1] + 2, dtype=torch.int32, device=q.device)
    keep, read, _, _ = _run(q, fine_centroids, fine_sizes, coarse_centroids, coarse_sizes, coarse_offsets,
                            fine_threshold, coarse_threshold, budget, coarse_budget, scale, hierarchical,
                            precision, seglen=seglen, sink=sink_tokens, window=window_tokens)
    return keep, read, torch.cumsum(seglen, dim=-1, dtype=torch.int32)
