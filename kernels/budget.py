"""Budget selection in Triton (same contract as ``budget_mask_ref``): keep the clusters of highest per-key
probability until at least ``target`` keys are kept, per (question, KV head), without sorting.

One program per (question, KV head) holds the head's clusters in registers and searches the
log-probability threshold: the kept key count of ``p >= t`` only falls as ``t`` rises, so the largest ``t``
whose count still reaches the target keeps exactly the clusters the sort-based reference keeps (the top ones
up to and including the cluster that reaches the target), up to clusters whose probabilities tie within the
search's resolution. Each round tests ``KWAY`` thresholds with one reduction (at KWAY = 2 a round is
log2(3) halvings: at most 21 rounds for the default 2^-32 of the log-probability range), and the search
stops as soon as no float lies strictly between its bounds, usually after 15-17 rounds (the rounds'
reductions across the program's warps are its latency). One launch replaces the reference's sort, cumsum
and scatter, and it stays CUDA-graph capturable. For a flat decode lookup the same launch also computes
the probabilities from the stored logits (``budget_mask_from_logits``), and with ``excl`` it writes the
prefix sums of the kept segment lengths that ``positions.kept_positions`` would otherwise sum itself.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .chain import chain_enter, chain_launch
from .lookup_tiles import _head_logz
from .sparse_attention import _cumsum, _max, _sum

__all__ = ["budget_mask", "budget_mask_from_logits"]


@triton.jit
def _probs_from_logits(LOGITS, PART, FIXED, s_gq, s_pk, NQ, NB, c, ok, HAS_FIXED: tl.constexpr,
                       BLOCK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr):
    """The lookup's per-key probabilities of one (question, head) from its stored logits [NQ, C] and partial
    log-normalisers [NB, NQ] (plus FIXED [NQ], the always-attended keys): mean_q exp(logit - log Z_q), as
    ``_prob_kernel`` computes them (pointers at the head's rows)."""
    offs_q = tl.arange(0, BLOCK_Q)
    logz = _head_logz(PART, s_pk, NB, FIXED, offs_q, offs_q < NQ, HAS_FIXED, BLOCK_P, BLOCK_Q)
    p = tl.full([BLOCK], 0.0, tl.float32)
    for qi in range(NQ):
        lz = _sum(tl.where(offs_q == qi, logz, 0.0), axis=0)
        row = tl.load(LOGITS + qi * s_gq + c, mask=ok, other=float("-inf"))
        p += tl.exp(row - lz)
    return tl.where(ok, p / NQ, 0.0)


@triton.jit
def _budget_kernel(P, SIZES, ALLOWED, TARGET, KEEP, SEGLEN, EXCL, LOGITS, PART, FIXED,
                   s_pb, s_ph, s_sh, s_ab, s_ah, s_tb, s_th, s_kb, s_kh, s_eb, s_eh, s_xb, s_xh,
                   s_gb, s_gh, s_gq, s_rb, s_rh, s_rk, s_fb, s_fh,
                   HK, NC, NQ, NB, sink_len, window_len, slack, ITERS: tl.constexpr, KWAY: tl.constexpr,
                   BLOCK: tl.constexpr, HAS_ALLOWED: tl.constexpr, WRITE_SEGLEN: tl.constexpr,
                   WRITE_EXCL: tl.constexpr, FROM_LOGITS: tl.constexpr, HAS_FIXED: tl.constexpr,
                   BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr = 0):
    """One program per (question, KV head); all NC <= BLOCK clusters live in registers for the search.
    Without HAS_ALLOWED every cluster is allowed. With FROM_LOGITS the probabilities are computed here from the
    lookup's logits and partial normalisers and written to P. With WRITE_SEGLEN it also writes the kept
    segment lengths SEGLEN[b, h, :] = (sink_len, kept size of each cluster, window_len) for ``kept_positions``,
    and with WRITE_EXCL their exclusive prefix sums EXCL[b, h, :] (the kept keys before each segment)."""
    chain_enter(PDL)
    pid = tl.program_id(0)
    b = (pid // HK).to(tl.int64)
    h = (pid % HK).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = c < NC
    if HAS_ALLOWED:
        ok = ok & (tl.load(ALLOWED + b * s_ab + h * s_ah + c, mask=c < NC, other=0) != 0)
    if FROM_LOGITS:
        p = _probs_from_logits(LOGITS + b * s_gb + h * s_gh, PART + b * s_rb + h * s_rh, FIXED + b * s_fb + h * s_fh,
                               s_gq, s_rk, NQ, NB, c, ok, HAS_FIXED, BLOCK, BLOCK_Q, BLOCK_P)
        tl.store(P + b * s_pb + h * s_ph + c, p, mask=c < NC)
    else:
        p = tl.load(P + b * s_pb + h * s_ph + c, mask=ok, other=0.0)
    sz = tl.where(ok, tl.load(SIZES + h * s_sh + c, mask=ok, other=0).to(tl.float32), 0.0)
    lp = tl.where(ok, tl.log(tl.maximum(p, 1e-30)), float("-inf"))  # (1e-38 would be typed fp64 by Triton)
    target = tl.load(TARGET + b * s_tb + h * s_th)
    # Invariant: count(lp >= lo) >= target, or lo is the smallest allowed lp (then every allowed cluster is
    # kept); count(lp >= hi) < target.
    lo = (-_max(tl.where(ok, -lp, float("-inf")), axis=0)).to(tl.float32)
    hi = (_max(lp, axis=0) + 1.0).to(tl.float32)
    kept_lo = _sum(sz, axis=0)  # count(lp >= lo): every allowed key
    enough = target * (1.0 + slack)  # with slack > 0 the search may stop once count(lo) <= this
    # Each round tests KWAY thresholds at once (one reduction of a [KWAY, BLOCK] tile instead of KWAY
    # dependent ones) and keeps the (KWAY + 1)-th of the interval between the last that still reaches the
    # target and the first that does not. The search ends after ITERS rounds or as soon as no float lies
    # strictly between lo and hi (their midpoint rounds onto one of them): then no log-probability can either,
    # and the decisions are final (usually 15-17 rounds instead of ITERS = 21). With slack > 0 it also ends
    # once lo keeps at most (1 + slack) x target keys: a superset of the exact selection, within that bound.
    frac = (tl.arange(0, KWAY) + 1).to(tl.float32) / (KWAY + 1)
    it = 0
    mid = lo + (hi - lo) * 0.5
    while (it < ITERS) & (mid > lo) & (mid < hi) & ((slack == 0.0) | (kept_lo > enough)):
        cand = lo + (hi - lo) * frac  # [KWAY] increasing thresholds inside (lo, hi)
        kept = _sum(tl.where(lp[None, :] >= cand[:, None], sz[None, :], 0.0), axis=1)  # [KWAY], non-increasing
        take = kept >= target
        n_take = _sum(take.to(tl.int32), axis=0)
        new_lo = _max(tl.where(take, cand, float("-inf")), axis=0)
        new_hi = -_max(tl.where(take, float("-inf"), -cand), axis=0)
        lo = tl.where(n_take > 0, new_lo, lo).to(tl.float32)
        kept_lo = tl.where(n_take > 0, -_max(tl.where(take, -kept, float("-inf")), axis=0), kept_lo)
        hi = tl.where(n_take < KWAY, new_hi, hi).to(tl.float32)
        mid = lo + (hi - lo) * 0.5
        it += 1
    lo = tl.where(target > 0, lo, float("inf")).to(tl.float32)  # a target of 0 keeps nothing
    keep = ok & (lp >= lo)
    tl.store(KEEP + b * s_kb + h * s_kh + c, keep.to(tl.uint8), mask=c < NC)
    if WRITE_SEGLEN:
        e_base = SEGLEN + b * s_eb + h * s_eh
        ln = tl.where(keep, sz, 0.0).to(tl.int32)
        tl.store(e_base + 1 + c, ln, mask=c < NC)
        tl.store(e_base + tl.arange(0, 1), tl.full([1], 0, tl.int32) + sink_len)
        tl.store(e_base + NC + 1 + tl.arange(0, 1), tl.full([1], 0, tl.int32) + window_len)
        if WRITE_EXCL:
            x_base = EXCL + b * s_xb + h * s_xh
            incl = _cumsum(ln, axis=0) + sink_len  # kept keys up to and including cluster c (sinks first)
            tl.store(x_base + 1 + c, incl - ln, mask=c < NC)
            tl.store(x_base + tl.arange(0, 1), tl.full([1], 0, tl.int32))
            tl.store(x_base + NC + 1 + tl.arange(0, 1), tl.full([1], 0, tl.int32) + _sum(ln, axis=0) + sink_len)


# clusters per head held in registers; more fall back to the reference's sort. 32768 covers a 512K context
# (32K fine clusters): on an H100 the in-register search took the flat budget lookup from 0.323 to 0.168 ms
# (Llama-3-8B) and from 0.499 to 0.249 ms (Llama-2-7B) with the same decisions as the sort
# (benchmarks/gpu_budget_large.py, docs/bench/session9/budget_large.txt). At 65536 (1M tokens) the search
# spills and is slower than the sort (0.736 against 0.491 ms, budget_1m.txt).
MAX_CLUSTERS = 32768
WARPS = None  # warps per program (None: the rule below); a launch setting for sweeps
# the rule: BLOCK / per_warp warps, clamped to [min_warps, 16]. Fewer warps make each round's reductions
# cheaper (no cross-warp step with one warp) but give each thread more clusters; small levels (a coarse level
# of a few hundred clusters) may prefer fewer than the fine level's 16.
WARP_RULE = {"per_warp": 512, "min_warps": 4}
KWAY = 2  # thresholds tested per round: log2(KWAY + 1) halvings each (H100 sweep: 2 beats 1, 4 and 8;
# benchmarks/gpu_flat_lookup_sweep.py, docs/bench/README.md)


def _warps(block: int) -> int:
    w = min(16, max(WARP_RULE["min_warps"], block // WARP_RULE["per_warp"]))
    return 1 << (w.bit_length() - 1)  # Triton takes powers of two


def _fallback(probs, sizes, allowed, target, seglen, sink, window, excl):
    """More clusters than the registers hold: the reference's sort, and the segment outputs in torch."""
    from .reference import budget_mask_ref

    b, hk, c = probs.shape
    if allowed is None:
        allowed = torch.ones(b, hk, c, dtype=torch.bool, device=probs.device)
    keep = budget_mask_ref(probs, sizes, allowed.bool(), target)
    if seglen is not None:
        seglen[..., 1:-1] = torch.where(keep, sizes.unsqueeze(0), 0)
        seglen[..., 0], seglen[..., -1] = sink, window
        if excl is not None:
            excl.copy_(torch.cumsum(seglen, dim=-1, dtype=torch.int32) - seglen)
    return keep


def _check_slack(slack) -> float:
    if not isinstance(slack, (int, float)) or isinstance(slack, bool) or not 0.0 <= slack < float("inf"):
        raise ValueError(f"slack must be a finite number >= 0 (0: the exact selection); got {slack!r}")
    return float(slack)


def _launch(probs, sizes, allowed, target, iters, seglen, sink, window, excl, logits=None, parts=None, fixed=None,
            slack=0.0):
    b, hk, c = probs.shape
    if allowed is not None:
        allowed = (allowed.view(torch.uint8) if allowed.dtype == torch.bool else allowed.to(torch.uint8)).contiguous()
    alw = allowed if allowed is not None else probs
    seg = seglen if seglen is not None else probs
    exc = excl if excl is not None and seglen is not None else seg
    lg = logits if logits is not None else probs
    pt = parts if parts is not None else probs
    fz = fixed if fixed is not None else probs
    nq = logits.shape[2] if logits is not None else 1
    nb = parts.shape[2] if parts is not None else 1
    target = target.float().contiguous()
    keep = torch.empty(b, hk, c, dtype=torch.uint8, device=probs.device)
    block = triton.next_power_of_2(max(c, 16))
    _budget_kernel[(b * hk,)](
        probs, sizes, alw, target, keep, seg, exc, lg, pt, fz,
        probs.stride(0), probs.stride(1), sizes.stride(0), alw.stride(0), alw.stride(1), target.stride(0),
        target.stride(1), keep.stride(0), keep.stride(1), seg.stride(0), seg.stride(1), exc.stride(0),
        exc.stride(1), lg.stride(0), lg.stride(1), lg.stride(2), pt.stride(0), pt.stride(1), pt.stride(2),
        fz.stride(0), fz.stride(1), hk, c, nq, nb, sink, window, slack,
        ITERS=math.ceil(iters / math.log2(KWAY + 1)), KWAY=KWAY, BLOCK=block, HAS_ALLOWED=allowed is not None,
        WRITE_SEGLEN=seglen is not None, WRITE_EXCL=excl is not None and seglen is not None,
        FROM_LOGITS=logits is not None, HAS_FIXED=fixed is not None, BLOCK_Q=max(2, triton.next_power_of_2(nq)),
        BLOCK_P=min(triton.next_power_of_2(max(nb, 2)), 512), num_warps=WARPS or _warps(block),
        **chain_launch(probs.device),
    )
    return keep.view(torch.bool)


def budget_mask(probs: torch.Tensor, sizes: torch.Tensor, allowed: torch.Tensor | None, target: torch.Tensor,
                iters: int = 32, *, seglen: torch.Tensor | None = None, sink: int = 0, window: int = 0,
                excl: torch.Tensor | None = None, slack: float = 0.0) -> torch.Tensor:
    """Keep clusters in descending per-key probability until ``target`` keys are kept (the threshold is
    searched until no float lies between its bounds, at most to a resolution of ``2 ** -iters`` of the
    log-probability range).

    probs [B, Hk, C] float32 (>= 0), sizes [Hk, C] int64, allowed [B, Hk, C] bool or uint8 (None: all),
    target [B, Hk] keys. Returns keep [B, Hk, C] bool. Clusters with probability 0 are kept only when the
    target needs them, as in the reference (it ranks them last). ``seglen`` [B, Hk, C + 2] int32: also write
    the kept segment lengths there (``sink``, kept cluster sizes, ``window``), as the lookup's positions need;
    ``excl`` (same shape, with ``seglen``): also their exclusive prefix sums. ``slack`` > 0 lets the search
    stop early, once its threshold keeps at most ``(1 + slack) * target`` keys: the kept clusters are then the
    exact selection plus possibly the next ones in probability order, within that bound (0: exact; the
    sorted fallback past ``MAX_CLUSTERS`` is always exact)."""
    slack = _check_slack(slack)
    if probs.shape[-1] > MAX_CLUSTERS:
        return _fallback(probs, sizes, allowed, target, seglen, sink, window, excl)
    return _launch(probs.float().contiguous(), sizes, allowed, target, iters, seglen, sink, window, excl,
                   slack=slack)


def budget_mask_from_logits(logits: torch.Tensor, parts: torch.Tensor, fixed: torch.Tensor | None,
                            sizes: torch.Tensor, target: torch.Tensor, iters: int = 32, *,
                            seglen: torch.Tensor | None = None, sink: int = 0, window: int = 0,
                            excl: torch.Tensor | None = None, slack: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``budget_mask`` over every cluster, with the per-key probabilities computed in the same launch from a
    flat lookup's logits [B, Hk, Q, C] and partial log-normalisers [B, Hk, NB, Q] (their logsumexp over NB,
    merged with ``fixed`` [B, Hk, Q] when given, is log Z_q): p_c = mean_q exp(logit_qc - log Z_q).
    Returns keep [B, Hk, C] bool and those probabilities [B, Hk, C] float32. ``slack``: as in ``budget_mask``."""
    slack = _check_slack(slack)
    b, hk, nq, c = logits.shape
    if parts.shape[:2] != (b, hk) or parts.shape[3] != nq:
        raise ValueError(f"parts must be [B, Hk, NB, Q] = [{b}, {hk}, NB, {nq}]; got {tuple(parts.shape)}")
    parts = parts.float().contiguous()
    fixed = fixed.float().contiguous() if fixed is not None else None
    if c > MAX_CLUSTERS:
        logz = torch.logsumexp(parts, dim=2)
        if fixed is not None:
            logz = torch.logaddexp(logz, fixed)
        probs = torch.exp(logits.float() - logz.unsqueeze(-1)).mean(dim=2)
        return _fallback(probs, sizes, None, target, seglen, sink, window, excl), probs
    probs = torch.empty(b, hk, c, dtype=torch.float32, device=logits.device)
    keep = _launch(probs, sizes, None, target, iters, seglen, sink, window, excl, logits=logits.float().contiguous(),
                   parts=parts, fixed=fixed, slack=slack)
    return keep, probs
