"""One lookup level's tensors and launches (``_Level``): the host side of the two Triton kernels of
``lookup_kernels.py`` for one level (coarse, flat fine, or fine grouped by coarse parent), with the launch
settings the H100 sweeps picked (``TUNING``, ``TUNING_FP8``). ``lookup.py`` runs the levels in order and
documents the algorithm.
"""

from __future__ import annotations

import os

import torch
import triton

from .centroid_fp8 import is_fp8
from .chain import chain_launch
from .dispatch import FEW_QUERIES
from .lookup_kernels import _lse_kernel, _prob_kernel

__all__ = ["FEW_QUERIES", "TUNING", "TUNING_FP8"]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Launch settings (the benchmark's tuning sweep edits these): clusters per program at a block-grouped level
# (coarse; a flat lookup's fine level: flat_block_c); warps per program for block- and parent-grouped levels;
# coarse clusters per program at a parent-grouped fine level, with few queries and with many (grouping saves
# re-reading the queries).
TUNING = {"block_c": 32, "block_warps": 2, "parent_warps": 1, "parent_group": 4, "parent_warps_prefill": 2,
          "parent_group_prefill": 16, "flat_block_c": 64, "flat_tiles": 1, "flat_stages": 1,
          "flat_programs": 512, "flat_tiles_max": 8, "flat_warps": 2, "flat_warps_one_query": 4,
          "decode_dot_min_q": 2, "many_path": "stationary"}
# More grouped queries per KV head than FEW_QUERIES (dispatch.py): the many-query path (lookup_many.py) unless
# many_path is "grouped" (this module's launches, kept to compare against in one benchmark run).
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
            spread.stride(0), keys.stride(0), keys.stride(1), cscale.stride(0), self.hk, self.nq, self.nc, self.ncc,
            self.q_per,
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
