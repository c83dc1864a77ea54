"""Hierarchical centroid lookup in Triton (same contract as ``centroid_lookup_ref``).

Two kernels (in ``lookup_kernels.py``), each run per level over a grid ``(cluster groups, query chunks, B * Hk)``. A program owns a
contiguous range of clusters: a block of ``BLOCK_C`` clusters (coarse level, flat lookup), or at the fine
level of a hierarchical lookup the fine clusters of one coarse cluster, so a dropped coarse cluster costs its
program nothing but writing zeros and the fine level does work only under kept coarse clusters.

``_lse_kernel``   partial log-normalisers ``logsumexp_c(s * q.c + log n_c)`` of the program's selected clusters
                  for each query (with few queries it keeps the logits in a scratch buffer too).
``_prob_kernel``  reduces the partials to ``log Z_q`` and sums ``exp(s * q.c - log Z_q)`` over the queries: the
                  per-key probability estimate of each cluster. With one query chunk it decides ``keep``
                  against the threshold in-kernel, writes the dropped coarse clusters' partial log-normalisers
                  (the coarse terms of the hierarchical denominator) and the kept segment lengths.

Scores: few queries (decode, Q <= 16) row by row in fp32 on CUDA cores; many queries with ``tl.dot``: the
native 16-bit dot when queries and centroids share a 16-bit dtype (products of 16-bit numbers are exact in
fp32, so this matches the reference's fp32 math up to summation order), else fp32 with ``precision`` "ieee"
(default) or "tf32" (faster). Budget mode picks the top clusters from the Triton-computed probabilities with
``budget.budget_mask`` (a bisection, no sort).
"""

from __future__ import annotations

import os

import torch
import triton

from .budget import budget_mask, budget_mask_from_logits
from .centroid_fp8 import dequantize_centroids, is_fp8
from .chain import chain_launch
from .decide import decide_from_logits
from .lookup_kernels import _lse_kernel, _prob_kernel
from .compaction import write_seglen
from .lookup_many import many_query_lookup
from .positions import kept_positions, segment_block, segment_lows

__all__ = ["centroid_lookup", "centroid_lookup_positions", "centroid_probs"]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------- host side

# Launch settings (the benchmark's tuning sweep edits these): clusters per program at a block-grouped level
# (coarse; a flat lookup's fine level: flat_block_c); warps per program for block- and parent-grouped levels; coarse clusters per program at a
# parent-grouped fine level, with few queries and with many (grouping saves re-reading the queries).
TUNING = {"block_c": 32, "block_warps": 2, "parent_warps": 1, "parent_group": 4, "parent_warps_prefill": 2,
          "parent_group_prefill": 16, "flat_block_c": 64, "flat_tiles": 1, "flat_stages": 1,
          "flat_programs": 512, "flat_tiles_max": 8, "flat_warps": 2, "flat_warps_one_query": 4,
          "decode_dot_min_q": 2, "many_path": "stationary"}
FEW_QUERIES = 16  # more grouped queries per KV head: the many-query path (lookup_many.py) unless many_path
# is "grouped" (this module's launches, kept to compare against in one benchmark run)
# measured best on an H100 (docs/bench/README.md). A flat fine level gives a program several blocks of
# flat_block_c centroids (loads pipelined over flat_stages stages): in decode as many as keep about
# flat_programs programs in flight (at most flat_tiles_max; the session-5 sweep's best at Llama-2-7B and
# Llama-3-8B 128K, 8 and 2 blocks, both give 512), flat_warps warps (flat_warps_one_query with one query row
# per KV head, where 2 warps spill); prefill keeps flat_tiles per program and block_warps.
TUNING_FP8 = {"flat_tiles_max": 4, "flat_warps_one_query": 2}
# An 8-bit table (centroid_fp8.py) overrides these: half the bytes per block, so 4 blocks read what 8 do at
# 16 bits, and one query row fits 2 warps without spilling (H100 sweep at 128K, docs/bench/session11/).


class _Level:
    """One level's tensors and launch helpers. ``coff`` [Hk, Cc + 1] makes it a fine level grouped by
    coarse parent (one program per ``group`` coarse clusters)."""

    def __init__(self, q, cent, sizes, scale, precision, coff=None, spread=None, flat_fine=False, cscale=None):
        self.q, self.cent, self.sizes, self.scale, self.precision, self.coff = q, cent, sizes, scale, precision, coff
        self.spread = spread.float().contiguous() if spread is not None else None
        self.fp8 = is_fp8(cent)  # 8-bit table: its power-of-two scales are folded into the queries
        self.cscale = cscale.float().contiguous() if self.fp8 else None
        self.b, self.hk, self.nq, self.d = q.shape
        self.nc = cent.shape[1]
        self.few = self.nq <= FEW_QUERIES  # decode: logits stored for the next launch, decode launch settings
        # 16-bit native dot: queries and table of one 16-bit dtype, or bf16 queries and an 8-bit table (widened
        # to bf16 in registers; fp16 queries times small scales could lose bits as fp16 subnormals)
        sixteen = ((q.dtype == cent.dtype and q.dtype in (torch.bfloat16, torch.float16))
                   or (self.fp8 and q.dtype == torch.bfloat16))
        # few queries score on CUDA cores row by row, or (16-bit, at least decode_dot_min_q of them) with one
        # tensor-core dot padded to 16 rows (H100, 128K: faster at 4 queries per KV head, slower at 1)
        dot = sixteen and self.nq >= TUNING["decode_dot_min_q"] and not _interpret()
        self.rowwise = self.few and not dot
        self.native = not self.rowwise and sixteen and not _interpret()
        if self.rowwise:
            block_q = max(2, triton.next_power_of_2(self.nq))  # 1 row: fewer registers but slower (session 5)
        else:
            block_q = 16 if (_interpret() or self.few) else 64
        tune = {**TUNING, **TUNING_FP8} if self.fp8 else TUNING
        block_c = 16 if (_interpret() or coff is not None) else tune["flat_block_c" if flat_fine else "block_c"]
        flat_decode = flat_fine and self.few and not _interpret()
        if flat_decode:
            warps = tune["flat_warps_one_query" if self.nq == 1 else "flat_warps"]
        elif coff is None:
            warps = TUNING["block_warps"]
        else:
            warps = TUNING["parent_warps"] if self.few else TUNING["parent_warps_prefill"]
        stages = TUNING["flat_stages"] if flat_fine and not _interpret() else 1
        self.cfg = dict(BLOCK_Q=block_q, BLOCK_C=block_c, num_warps=4 if _interpret() else warps, num_stages=stages)
        if coff is not None:  # units: coarse parents, `group` per program
            self.ncc = coff.shape[1] - 1
            self.group = TUNING["parent_group"] if self.few else TUNING["parent_group_prefill"]
        else:  # units: blocks of block_c clusters; a flat fine level gives a program several (pipelined loads)
            self.ncc = triton.cdiv(max(self.nc, 1), block_c)
            self.group = TUNING["flat_tiles"] if flat_fine else 1
            if flat_decode:
                per = self.ncc * self.b * self.hk // tune["flat_programs"]
                self.group = min(tune["flat_tiles_max"], 1 << max(per, 1).bit_length() - 1)
        if _interpret() and (coff is not None or flat_fine):
            self.group = 2
        self.nb = triton.cdiv(self.ncc, self.group)
        self.nqc = 1 if self.nq <= 256 else triton.cdiv(self.nq, 256)  # prefill spreads queries over programs
        self.q_per = triton.cdiv(self.nq, self.nqc)
        self.grid = (self.nb, self.nqc, self.b * self.hk)
        self.fused = self.nqc == 1 and self.nq <= 64  # reduce the partials in the probability kernel

    def _common(self, keepc):
        c = self.cfg
        coff = self.coff if self.coff is not None else self.sizes
        return dict(HEAD_DIM=self.d, BLOCK_D=triton.next_power_of_2(self.d), BLOCK_Q=c["BLOCK_Q"],
                    BLOCK_C=c["BLOCK_C"], PRECISION=self.precision, ROWWISE=self.rowwise, NATIVE=self.native,
                    BY_PARENT=self.coff is not None, GROUP=self.group, num_warps=c["num_warps"],
                    num_stages=c["num_stages"], FP8=self.fp8,
                    HAS_SPREAD=self.spread is not None), keepc, coff

    def _cscale(self, dummy):
        return self.cscale if self.cscale is not None else dummy

    def _spread(self, dummy):
        return self.spread if self.spread is not None else dummy

    def lse(self, keepc=None, dropped=False, always=None):
        """Partial log-normalisers [B, Hk, NB, Q]; the allowed mask [B, Hk, C] uint8 (fine level grouped by
        parent) and the logits scratch [B, Hk, Q, C] (few queries; entries of unselected clusters unwritten).
        ``always`` = (keys [Hk, N, D], sink, window): one more partial row, NB + 1 in all, holds the exact
        log-normaliser of the always-attended keys (``always_logz_ref``), computed by extra programs of the
        same launch (block-grouped level only)."""
        q, cent, dev = self.q, self.cent, self.q.device
        if always is not None and self.coff is not None:
            raise ValueError("the always-attended row is computed at a block-grouped (coarse or flat) level")
        nb = self.nb + (always is not None)
        part = torch.empty(self.b, self.hk, nb, self.nq, dtype=torch.float32, device=dev)
        by_parent = self.coff is not None
        allowed = torch.empty(self.b, self.hk, self.nc, dtype=torch.uint8, device=dev) if by_parent else part
        store = self.few and not dropped
        logits = torch.empty(self.b, self.hk, self.nq, self.nc, dtype=torch.float32, device=dev) if store else part
        common, keepc, coff = self._common(keepc if keepc is not None else part)
        spread = self._spread(self.sizes)
        keys, sink, window = always if always is not None else (cent, 0, 0)
        keys = keys if keys.stride(-1) == 1 else keys.contiguous()
        cscale = self._cscale(part)
        n = keys.shape[1]
        sink = min(sink, n)
        window = min(window, n - sink)
        _lse_kernel[(nb,) + self.grid[1:]](
            q, cent, self.sizes, keepc, coff, allowed, part, logits, spread, keys, cscale,
            q.stride(0), q.stride(1), q.stride(2), cent.stride(0), cent.stride(1), self.sizes.stride(0),
            keepc.stride(0), keepc.stride(1), coff.stride(0), allowed.stride(0), allowed.stride(1),
            part.stride(0), part.stride(1), part.stride(2), logits.stride(0), logits.stride(1), logits.stride(2),
            spread.stride(0), keys.stride(0), keys.stride(1), cscale.stride(0), self.hk, self.nq, self.nc, self.ncc, self.q_per,
            self.scale, 0.5 * self.scale * self.scale, self.nb, n, sink, window,
            DROPPED=dropped, STORE_LOGITS=store, ALWAYS=always is not None, **common, **chain_launch(q.device),
        )
        return part, (allowed if by_parent else None), (logits if store else None)

    def probs(self, parts, keepc=None, allowed=None, thr=None, write_dropped=False, seglen=None, sink=0, window=0,
              logits=None, fixed=None):
        """Per-key probabilities [B, Hk, C] float32 and, with ``thr``, keep [B, Hk, C] uint8 (plus the
        dropped clusters' partial log-normalisers [B, Hk, NB, Q] when ``write_dropped``). ``parts``: partial
        log-normalisers [B, Hk, NB', Q] whose logsumexp is log Z."""
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
        decide = finish and thr is not None
        nt = triton.cdiv(self.q_per, self.cfg["BLOCK_Q"])  # query tiles per program, one psum row each
        psum = torch.empty(self.b, self.hk, self.nqc * nt, self.nc, dtype=torch.float32, device=dev)
        probs_out = torch.empty(self.b, self.hk, self.nc, dtype=torch.float32, device=dev) if finish else psum
        keep = torch.empty(self.b, self.hk, self.nc, dtype=torch.uint8, device=dev) if decide else probs_out
        dpart = (torch.empty(self.b, self.hk, self.nb, self.nq, dtype=torch.float32, device=dev)
                 if write_dropped and decide else psum)
        alw = allowed if allowed is not None else psum
        seg = seglen if seglen is not None and decide else psum
        lg = logits if logits is not None else psum
        common, keepc, coff = self._common(keepc if keepc is not None else psum)
        block_p = min(triton.next_power_of_2(max(part1.shape[2], p2.shape[2])), 512)
        spread = self._spread(self.sizes)
        fz = fixed.float() if fixed is not None else psum
        cscale = self._cscale(psum)
        _prob_kernel[self.grid](
            q, cent, self.sizes, keepc, coff, alw, logz, part1, p2, thr if thr is not None else psum, psum, keep,
            dpart, seg, lg, spread, fz, probs_out, cscale, cscale.stride(0),
            q.stride(0), q.stride(1), q.stride(2), cent.stride(0), cent.stride(1), self.sizes.stride(0),
            keepc.stride(0), keepc.stride(1), coff.stride(0), alw.stride(0), alw.stride(1),
            logz.stride(0), logz.stride(1), part1.stride(0), part1.stride(1), part1.stride(2),
            p2.stride(0), p2.stride(1), p2.stride(2), psum.stride(0), psum.stride(1), psum.stride(2),
            seg.stride(0), seg.stride(1), dpart.stride(0), dpart.stride(1), dpart.stride(2),
            lg.stride(0), lg.stride(1), lg.stride(2), spread.stride(0), fz.stride(0), fz.stride(1),
            probs_out.stride(0), probs_out.stride(1),
            self.hk, self.nq, self.nc, self.ncc, part1.shape[2], p2.shape[2], self.q_per, nt, self.scale,
            0.5 * self.scale * self.scale, sink, window, HAS_FIXED=fixed is not None,
            HAS_ALLOWED=allowed is not None and self.coff is None, FUSED=self.fused,
            HAS_PART2=part2 is not None and self.fused, FINISH=finish, DECIDE=decide,
            WRITE_DROPPED=write_dropped and decide, WRITE_SEGLEN=seglen is not None and decide,
            LOAD_LOGITS=logits is not None, BLOCK_P=block_p, **common, **chain_launch(q.device),
        )
        probs = probs_out if finish else psum.sum(dim=2) / self.nq
        if thr is not None and not decide:  # many queries: decide here
            sel = allowed.bool() if allowed is not None else torch.ones_like(probs, dtype=torch.bool)
            keep = (sel & (probs >= thr.view(1, -1, 1))).to(torch.uint8)
        return probs, (keep if thr is not None else None), (dpart if write_dropped and decide else None)


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
         coarse_threshold, budget, coarse_budget, scale, hierarchical, precision, seglen=None, sink=0, window=0,
         fine_spread=None, coarse_spread=None, fixed_logz=None, always_keys=None, excl=None, budget_slack=0.0,
         blocksum=None, fine_centroid_scales=None, coarse_centroid_scales=None):
    """The whole lookup. Returns keep [B, Hk, Cf] bool, the allowed mask [B, Hk, Cf] uint8 (None when flat),
    the fine and the coarse probabilities. With ``seglen`` [B, Hk, Cf + 2] int32 it also writes the kept
    length of every segment (sinks, fine clusters, window) there, and in budget mode with ``excl`` (same
    shape) their exclusive prefix sums; a flat threshold lookup of few queries (``_decides_from_logits``)
    writes the kept keys per block of segments into ``blocksum`` (``decide.decide_from_logits``).
    ``always_keys`` = (keys, sink, window) stands for ``fixed_logz = always_logz(q, keys, sink, window,
    scale)``, computed inside the first level's normaliser launch (coarse, or fine when flat) by extra
    programs. 8-bit (float8 e4m3) centroid tables come with their ``*_centroid_scales`` [Hk, D]
    (``centroid_fp8``)."""
    _check_args(fine_threshold, budget, coarse_threshold, coarse_budget, hierarchical, precision)
    if always_keys is not None and fixed_logz is not None:
        raise ValueError("give at most one of fixed_logz and always_keys")
    _check_fp8(fine_centroids, fine_centroid_scales, "fine")
    if hierarchical:
        _check_fp8(coarse_centroids, coarse_centroid_scales, "coarse")
    if q.shape[2] > FEW_QUERIES and TUNING["many_path"] == "stationary":
        # the many-query kernels score 16-bit or fp32 tables: an 8-bit one is widened first, exactly (an e4m3
        # value times a power of two is a bf16 number; pass the 16-bit table for prefill to skip this)
        wide = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
        if is_fp8(fine_centroids):
            fine_centroids = dequantize_centroids(fine_centroids, fine_centroid_scales).to(wide)
        if hierarchical and is_fp8(coarse_centroids):
            coarse_centroids = dequantize_centroids(coarse_centroids, coarse_centroid_scales).to(wide)
    first = coarse_centroids if hierarchical else fine_centroids
    scored_as = q.dtype if is_fp8(first) else first.dtype  # an 8-bit table is scored in the queries' dtype
    if always_keys is not None and always_keys[0].dtype != scored_as:
        from .always_logz import always_logz  # the launch scores keys as centroids: same dtype needed

        fixed_logz, always_keys = always_logz(q, *always_keys, scale), None
    q = q if q.stride(-1) == 1 else q.contiguous()
    b, hk, nq, _ = q.shape
    if nq > FEW_QUERIES and TUNING["many_path"] == "stationary":
        return many_query_lookup(q, fine_centroids, fine_sizes, coarse_centroids, coarse_sizes, coarse_offsets,
                                 fine_threshold, coarse_threshold, budget, coarse_budget, scale, hierarchical,
                                 precision, seglen=seglen, sink=sink, window=window, fine_spread=fine_spread,
                                 coarse_spread=coarse_spread, fixed_logz=fixed_logz, always_keys=always_keys,
                                 excl=excl, budget_slack=budget_slack)
    thr = fine_threshold.float().contiguous() if fine_threshold is not None else None
    coarse_probs = allowed = None
    seg = dict(seglen=seglen, sink=sink, window=window, fixed=fixed_logz)
    if not hierarchical:
        fine = _Level(q, fine_centroids, fine_sizes, scale, precision, spread=fine_spread, flat_fine=True,
                      cscale=fine_centroid_scales)
        part, _, logits = fine.lse(always=always_keys)  # with always_keys: the extra row is in the normaliser
        if thr is None and logits is not None:  # budget, few queries: the probabilities in the budget launch
            keep, probs = budget_mask_from_logits(logits, part, fixed_logz, fine_sizes, budget, seglen=seglen,
                                                  sink=sink, window=window, excl=excl, slack=budget_slack)
            return keep, None, probs, None
        if logits is not None:  # threshold, few queries (_decides_from_logits): decisions from the logits
            probs, keep = decide_from_logits(logits, part, thr, fine_sizes, fixed_logz=fixed_logz, seglen=seglen,
                                             blocksum=blocksum, sink=sink, window=window)
            return keep, None, probs, None
        probs, keep, _ = fine.probs([part], thr=thr, logits=logits, **seg)
    else:
        coarse = _Level(q, coarse_centroids, coarse_sizes, scale, precision, spread=coarse_spread,
                        cscale=coarse_centroid_scales)
        fine = _Level(q, fine_centroids, fine_sizes, scale, precision, coff=coarse_offsets, spread=fine_spread,
                      cscale=fine_centroid_scales)
        part_c, _, logits_c = coarse.lse(always=always_keys)
        cfixed = fixed_logz
        if always_keys is not None:  # the last partial row: in the coarse normaliser already, and the fine one's
            seg["fixed"], cfixed = part_c[:, :, -1], None
        if thr is not None:
            cthr = coarse_threshold.float().contiguous()
            coarse_probs, keep_c, dpart = coarse.probs([part_c], thr=cthr, write_dropped=True, fixed=cfixed)
        else:
            coarse_probs, _, _ = coarse.probs([part_c], logits=logits_c, fixed=cfixed)
            keep_c = budget_mask(coarse_probs, coarse_sizes, None, coarse_budget).view(torch.uint8)
            dpart = None
        if dpart is None:  # the dropped coarse clusters' terms of the denominator, in a separate pass
            dpart, _, _ = coarse.lse(keepc=keep_c, dropped=True)
        part_f, allowed, logits = fine.lse(keepc=keep_c)
        probs, keep, _ = fine.probs([part_f, dpart], keepc=keep_c, allowed=allowed, thr=thr, logits=logits, **seg)
    if thr is None:
        keep = budget_mask(probs, fine_sizes, allowed, budget, seglen=seglen, sink=sink, window=window, excl=excl,
                           slack=budget_slack)
    else:
        keep = keep.view(torch.bool)
    if seglen is not None and thr is not None and fine.nqc > 1:
        write_seglen(seglen, keep, fine_sizes, sink, window)
    return keep, allowed, probs, coarse_probs


def _check_fp8(centroids, scales, level):
    if is_fp8(centroids) and (scales is None or scales.shape != (centroids.shape[0], centroids.shape[2])):
        raise ValueError(f"8-bit {level} centroids {tuple(centroids.shape)} need {level}_centroid_scales "
                         f"[Hk, D] = {(centroids.shape[0], centroids.shape[2])} (centroid_fp8.quantize_centroids); "
                         f"got {None if scales is None else tuple(scales.shape)}")
    if scales is not None and not is_fp8(centroids):
        raise ValueError(f"{level}_centroid_scales go with float8 e4m3 {level} centroids; got {centroids.dtype}")


def _decides_from_logits(q, fine_threshold, hierarchical) -> bool:
    """Whether ``_run`` takes its threshold decisions with ``decide_from_logits`` (flat, few queries)."""
    return fine_threshold is not None and not hierarchical and q.shape[2] <= FEW_QUERIES


def _read(allowed, b, hk, cf, cc, device):
    if allowed is None:
        return torch.full((b, hk), cf, dtype=torch.int64, device=device)
    return allowed.sum(-1) + cc


LOOKUP_DOC_ARGS = """
    Args:
        q: [B, Hk, Q, D] grouped queries (``group_queries_ref``), any float dtype.
        fine_centroids: [Hk, Cf, D] any float dtype; fine_sizes: [Hk, Cf] int64 (keys per cluster, >= 1).
        coarse_centroids: [Hk, Cc, D]; coarse_sizes: [Hk, Cc] int64; coarse_offsets: [Hk, Cc + 1] int64.
        fine_threshold / coarse_threshold: [Hk] float32 per-key probability thresholds (threshold mode), or None.
        budget / coarse_budget: [B, Hk] float32 keys to keep per level (budget mode), or None.
        scale: softmax scale; hierarchical: False for a flat lookup over every fine centroid.
        fine_spread / coarse_spread: [Hk, Cf] / [Hk, Cc] per-dimension key variance per cluster (the variance
            term of the estimate), or None; fixed_logz: [B, Hk, Q] exact log-normaliser of the always-attended
            keys (``always_logz_ref``), or None.
        precision: fp32 scores of many queries (Q > 16) against fp32 centroids: "ieee" (exact, default) or
            "tf32" (faster; decisions may differ from the reference within about 1e-3 of a threshold).
        fine_centroid_scales / coarse_centroid_scales: [Hk, D] float32 scales of float8 e4m3 centroid tables
            (``centroid_fp8.quantize_centroids``; the lookup scores the dequantised table), or None.
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
    fine_spread: torch.Tensor | None = None,
    coarse_spread: torch.Tensor | None = None,
    fixed_logz: torch.Tensor | None = None,
    precision: str = "ieee",
    fine_centroid_scales: torch.Tensor | None = None,
    coarse_centroid_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which fine clusters to keep, by coarse-then-fine centroid lookup (Triton; same arguments and results
    as ``centroid_lookup_ref``).

    Returns:
        keep [B, Hk, Cf] bool, centroids_read [B, Hk] int64.
    """
    keep, allowed, _, _ = _run(q, fine_centroids, fine_sizes, coarse_centroids, coarse_sizes, coarse_offsets,
                               fine_threshold, coarse_threshold, budget, coarse_budget, scale, hierarchical,
                               precision, fine_spread=fine_spread, coarse_spread=coarse_spread,
                               fixed_logz=fixed_logz, fine_centroid_scales=fine_centroid_scales,
                               coarse_centroid_scales=coarse_centroid_scales)
    return keep, _read(allowed, *keep.shape, coarse_centroids.shape[1], q.device)


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
    fine_spread: torch.Tensor | None = None,
    coarse_spread: torch.Tensor | None = None,
    fixed_logz: torch.Tensor | None = None,
    precision: str = "ieee",
    counter: tuple | None = None,
    always_keys: tuple | None = None,
    budget_slack: float = 0.0,
    fine_centroid_scales: torch.Tensor | None = None,
    coarse_centroid_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``centroid_lookup`` plus the sorted position of every kept key (sinks, kept clusters, window) for
    ``sparse_attention.sparse_attention_positions``: no host sync, CUDA-graph capturable.

    Extra args: fine_offsets [Hk, Cf + 1] int64, or seg_lows [Hk, Cf + 2] int32 from
    ``positions.segment_lows`` (compute it once per layer); num_tokens N; sink_tokens; window_tokens;
    counter: ``(acc, token_bytes, centroid_bytes, dense_bytes)`` to add the bytes read and the dense bytes
    to an int64 [2] accumulator on the device (``positions.kept_positions``); always_keys:
    ``(keys [Hk, N, D], sink_tokens, window_tokens)`` instead of ``fixed_logz``: the same exact
    log-normaliser of the always-attended keys, computed by extra programs of the coarse level's first
    launch (one launch less than ``always_logz`` + lookup); budget_slack: the fine budget search may stop once
    it keeps at most (1 + budget_slack) x budget keys (``budget.budget_mask``'s ``slack``; 0: exact).
    Returns:
        keep [B, Hk, Cf] bool, centroids_read [B, Hk] int64, pos [B, Hk, N] int32, total [B, Hk] int32.
    """
    if seg_lows is None:
        if fine_offsets is None:
            raise ValueError("give fine_offsets or seg_lows")
        seg_lows = segment_lows(fine_offsets, num_tokens, window_tokens)
    b, hk = q.shape[:2]
    seglen = torch.empty(b, hk, fine_centroids.shape[1] + 2, dtype=torch.int32, device=q.device)
    excl = torch.empty_like(seglen) if budget is not None else None  # budget mode: prefix sums in the search
    blocksum = None  # flat threshold decode: kept keys per block of segments, from the decisions launch
    if _decides_from_logits(q, fine_threshold, hierarchical):
        blocksum = torch.empty(b, hk, triton.cdiv(seglen.shape[2], segment_block()), dtype=torch.int32,
                               device=q.device)
    keep, allowed, _, _ = _run(q, fine_centroids, fine_sizes, coarse_centroids, coarse_sizes, coarse_offsets,
                               fine_threshold, coarse_threshold, budget, coarse_budget, scale, hierarchical,
                               precision, seglen=seglen, sink=sink_tokens, window=window_tokens,
                               fine_spread=fine_spread, coarse_spread=coarse_spread, fixed_logz=fixed_logz,
                               always_keys=always_keys, excl=excl, budget_slack=budget_slack, blocksum=blocksum,
                               fine_centroid_scales=fine_centroid_scales,
                               coarse_centroid_scales=coarse_centroid_scales)
    scored = coarse_centroids.shape[1] if allowed is not None else fine_centroids.shape[1]  # besides allowed
    pos, total, read = kept_positions(seglen, seg_lows, num_tokens, allowed=allowed, num_coarse=scored,
                                      counter=counter, excl=excl, blocksum=blocksum)
    return keep, read, pos, total


centroid_lookup_positions.__doc__ += LOOKUP_DOC_ARGS

