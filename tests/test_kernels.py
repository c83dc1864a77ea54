"""Triton kernels vs their torch references, side by side on random inputs.

On CPU the kernels run under the Triton interpreter at small sizes; ``-m gpu`` cases run real sizes on CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # must happen before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sqattn_index.kernels import reference as ref  # noqa: E402
from sqattn_index.kernels import reference_lookup as ref_lookup  # noqa: E402
from sqattn_index.kernels.dispatch import get_ops  # noqa: E402
from sqattn_index.kernels.always_logz import always_logz  # noqa: E402
from sqattn_index.kernels.budget import budget_mask  # noqa: E402
from sqattn_index.kernels.lookup import (  # noqa: E402
    centroid_lookup,
    centroid_lookup_positions,
    centroid_probs,
)
from sqattn_index.kernels.compaction import compact_fine  # noqa: E402
from sqattn_index.kernels.merge import lse_merge  # noqa: E402
from sqattn_index.kernels.sparse_attention import sparse_attention, sparse_attention_positions  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# The interpreter evaluates log(0) = -inf of empty softmax parts through numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def rel_rms(x: torch.Tensor, y: torch.Tensor) -> float:
    """||x - y|| / ||y|| in float64."""
    x, y = x.double(), y.double()
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def attn_tol(dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return 1e-5 if not CUDA else 3e-3  # tf32 tensor cores on the GPU
    return 1e-5 if not CUDA else 1e-2  # the interpreter upcasts to fp32; GPU rounds p to bf16/fp16


# ----------------------------------------------------------------------------------------------- layouts


def make_layout(hk: int, n: int, sink: int, window: int, cc: int, gen: torch.Generator):
    """Ragged fine/coarse clustering of the sorted positions [sink, n - window) for every head.

    Returns fine_offsets [Hk, Cf + 1], fine_sizes [Hk, Cf], coarse_offsets [Hk, Cc + 1], coarse_sizes [Hk, Cc]
    (every head has the same Cf and Cc, as in ``LayerKV``).
    """
    span = n - sink - window
    cf = max(cc, span // 12)
    fine_offsets, coarse_offsets = [], []
    for _ in range(hk):
        cuts = torch.randperm(span - 1, generator=gen)[: cf - 1] + 1  # cf ragged, non-empty fine clusters
        fo = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([span])]) + sink
        ccuts = torch.randperm(cf - 1, generator=gen)[: cc - 1] + 1
        co = torch.cat([torch.tensor([0]), ccuts.sort().values, torch.tensor([cf])])
        fine_offsets.append(fo)
        coarse_offsets.append(co)
    fine_offsets = torch.stack(fine_offsets)
    coarse_offsets = torch.stack(coarse_offsets)
    fine_sizes = fine_offsets.diff(dim=1)
    csum = torch.cat([torch.zeros(hk, 1, dtype=torch.int64), fine_sizes.cumsum(1)], 1)
    coarse_sizes = csum.gather(1, coarse_offsets[:, 1:]) - csum.gather(1, coarse_offsets[:, :-1])
    return fine_offsets, fine_sizes, coarse_offsets, coarse_sizes


def make_centroids(keys: torch.Tensor, fine_offsets, fine_sizes, coarse_offsets, coarse_sizes):
    """Fine centroids = mean of each cluster's keys; coarse = size-weighted mean of fine centroids."""
    hk, _, d = keys.shape
    kf = keys.float()
    csum = torch.cat([torch.zeros(hk, 1, d), kf.cumsum(1)], 1)
    fine = (csum.gather(1, fine_offsets[:, 1:, None].expand(-1, -1, d))
            - csum.gather(1, fine_offsets[:, :-1, None].expand(-1, -1, d))) / fine_sizes[..., None]
    w = torch.cat([torch.zeros(hk, 1, d), (fine * fine_sizes[..., None]).cumsum(1)], 1)
    coarse = (w.gather(1, coarse_offsets[:, 1:, None].expand(-1, -1, d))
              - w.gather(1, coarse_offsets[:, :-1, None].expand(-1, -1, d))) / coarse_sizes[..., None]
    return fine.contiguous(), coarse.contiguous()


def clustered_keys(hk, n, d, fine_offsets, gen, spread=0.5):
    """Keys with cluster structure: a random centre per fine cluster plus noise (sinks/window random)."""
    keys = torch.randn(hk, n, d, generator=gen)
    for h in range(hk):
        sizes = fine_offsets[h].diff()
        centres = torch.randn(len(sizes), d, generator=gen) * 1.5
        s, e = int(fine_offsets[h, 0]), int(fine_offsets[h, -1])
        keys[h, s:e] = centres.repeat_interleave(sizes, 0) + spread * keys[h, s:e]
    return keys


def random_ranges(b, hk, n, gen, empty_heads=()):
    """Sorted, coalesced, padded ranges with ragged sizes (1 to ~n/4 keys); heads in ``empty_heads`` keep nothing."""
    starts, ends, counts = [], [], []
    for bi in range(b):
        for h in range(hk):
            cuts = (torch.randperm(n - 1, generator=gen)[: int(torch.randint(2, 24, (1,), generator=gen))] + 1)
            edges = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([n])])
            segs = list(zip(edges[:-1].tolist(), edges[1:].tolist()))
            keep = [s for i, s in enumerate(segs) if i % 2 == int(torch.randint(0, 2, (1,), generator=gen))]
            if (bi, h) in empty_heads:
                keep = []
            starts.append([s for s, _ in keep])
            ends.append([e for _, e in keep])
            counts.append(len(keep))
    r = max(max(counts), 1)
    st = torch.zeros(b * hk, r, dtype=torch.int64)
    en = torch.zeros(b * hk, r, dtype=torch.int64)
    for i, (s, e) in enumerate(zip(starts, ends)):
        st[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
        en[i, : len(e)] = torch.tensor(e, dtype=torch.int64)
    return st.view(b, hk, r), en.view(b, hk, r), torch.tensor(counts).view(b, hk)


# ----------------------------------------------------------------------------------------------- sparse attention


def _check_attention(out, lse, rout, rlse, counts, g, tol):
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == rout.shape and lse.shape == rlse.shape
    assert torch.isfinite(out).all(), "NaN/inf in out"
    empty = (counts == 0).repeat_interleave(g, dim=1)  # [B, Hq]
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()
    assert rel_rms(out, rout) < tol
    finite = torch.isfinite(rlse)
    if finite.any():
        assert (lse[finite] - rlse[finite]).abs().max() < 50 * tol + 1e-5


SPARSE_CASES = [
    pytest.param(1, 2, 4, 1, 300, 128, "bf16", None, id="decode-B1-G4-D128-bf16"),
    pytest.param(2, 2, 1, 1, 257, 64, "fp16", 3, id="decode-B2-G1-D64-fp16-split3"),
    pytest.param(2, 1, 3, 1, 200, 64, "fp32", 1, id="decode-B2-G3-D64-fp32-nosplit"),
    pytest.param(2, 2, 2, 9, 230, 64, "bf16", 2, id="prefill-B2-G2-T9-D64-bf16"),
    pytest.param(1, 2, 1, 40, 190, 128, "fp32", None, id="prefill-B1-G1-T40-D128-fp32"),
    pytest.param(1, 1, 2, 20, 150, 128, "fp16", 4, id="prefill-B1-G2-T20-D128-fp16-split4"),
]


@pytest.mark.parametrize("b,hk,g,t,n,d,dt,splits", SPARSE_CASES)
def test_sparse_attention_matches_ref(b, hk, g, t, n, d, dt, splits):
    gen = torch.Generator().manual_seed(1000 * b + 100 * g + t + d)
    dtype = DTYPES[dt]
    q = torch.randn(b, hk * g, t, d, generator=gen).to(dtype).to(DEV)
    keys = torch.randn(hk, n, d, generator=gen).to(dtype).to(DEV)
    values = torch.randn(hk, n, d, generator=gen).to(dtype).to(DEV)
    starts, ends, counts = (x.to(DEV) for x in random_ranges(b, hk, n, gen, empty_heads={(b - 1, hk - 1)}))
    scale = d ** -0.5
    out, lse = sparse_attention(q, keys, values, starts, ends, counts, scale, num_splits=splits)
    rout, rlse = ref.sparse_attention_ref(q, keys, values, starts, ends, counts, scale)
    _check_attention(out, lse, rout, rlse, counts, g, attn_tol(dtype))


def test_sparse_attention_nothing_kept():
    q = torch.randn(1, 4, 2, 64).to(DEV)
    keys = torch.randn(2, 50, 64).to(DEV)
    zeros = torch.zeros(1, 2, 1, dtype=torch.int64, device=DEV)
    out, lse = sparse_attention(q, keys, keys, zeros, zeros, zeros[..., 0], 0.125)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("kept", [pytest.param((32, 7), id="heads-keep-32-and-7-keys"),
                                  pytest.param((48, 16), id="heads-keep-48-and-16-keys"),
                                  pytest.param((33, 1), id="heads-keep-33-and-1-keys")])
def test_sparse_attention_whole_and_partial_tiles(kept):
    """Kept key counts that fill whole 16-key tiles, end in a partial tile, or are one key (1 and 2 splits)."""
    gen = torch.Generator().manual_seed(sum(kept))
    n = 80
    q = torch.randn(1, 4, 1, 64, generator=gen).to(DEV)
    keys = torch.randn(2, n, 64, generator=gen).to(DEV)
    values = torch.randn(2, n, 64, generator=gen).to(DEV)
    starts = torch.tensor([[[3], [n - kept[1]]]], dtype=torch.int64, device=DEV)
    ends = starts + torch.tensor([[[kept[0]], [kept[1]]]], dtype=torch.int64, device=DEV)
    counts = torch.ones(1, 2, dtype=torch.int64, device=DEV)
    for splits in (1, 2):
        out, lse = sparse_attention(q, keys, values, starts, ends, counts, 0.125, num_splits=splits, block_n=16)
        rout, rlse = ref.sparse_attention_ref(q, keys, values, starts, ends, counts, 0.125)
        _check_attention(out, lse, rout, rlse, counts, 2, attn_tol(torch.float32))


@pytest.mark.parametrize("scale", [0.0, -0.125, float("nan")])
def test_sparse_attention_rejects_non_positive_scale(scale):
    q = torch.randn(1, 2, 1, 64).to(DEV)
    keys = torch.randn(1, 20, 64).to(DEV)
    s = torch.zeros(1, 1, 1, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="positive softmax scale"):
        sparse_attention(q, keys, keys, s, s + 5, s[..., 0] + 1, scale)
    with pytest.raises(ValueError, match="positive softmax scale"):  # the reference holds the same contract
        ref.sparse_attention_ref(q, keys, keys, s, s + 5, s[..., 0] + 1, scale)


def test_sparse_attention_strided_kv():
    """K/V as a head-major slice of a larger cache (non-contiguous head stride)."""
    gen = torch.Generator().manual_seed(7)
    big = torch.randn(2, 3, 120, 64, generator=gen).to(DEV)  # [Hk, 3, N, D]
    keys, values = big[:, 0], big[:, 2]
    q = torch.randn(1, 4, 1, 64, generator=gen).to(DEV)
    starts, ends, counts = (x.to(DEV) for x in random_ranges(1, 2, 120, gen))
    out, lse = sparse_attention(q, keys, values, starts, ends, counts, 0.125)
    rout, rlse = ref.sparse_attention_ref(q, keys, values, starts, ends, counts, 0.125)
    _check_attention(out, lse, rout, rlse, counts, 2, attn_tol(torch.float32))


# ----------------------------------------------------------------------------------------------- lookup


def _ref_probs(q, fc, fs, cc, cs, co, scale, coarse_keep=None, terms=None):
    """Reference per-key probabilities: coarse [B, Hk, Cc], and fine [B, Hk, Cf] given the coarse keep.
    ``terms``: (fine_spread, coarse_spread, fixed_logz) of the estimate, written out here independently."""
    qf = q.float()
    b, hk, _, _ = qf.shape
    cf = fc.shape[1]
    fsp, csp, fixed = terms if terms is not None else (None, None, None)
    half_qn2 = 0.5 * scale * scale * (qf * qf).sum(-1, keepdim=True)  # [B, Hk, Q, 1]
    fine_logits = scale * torch.einsum("bhqd,hcd->bhqc", qf, fc.float())
    if fsp is not None:
        fine_logits = fine_logits + half_qn2 * fsp.view(1, hk, 1, cf)
    fls = fs.float().log().view(1, hk, 1, cf)
    if cc is None:
        return ref_lookup._per_key_probs(fine_logits, fls, fixed), None
    ncc = cc.shape[1]
    cls = cs.float().log().view(1, hk, 1, ncc)
    coarse_logits = scale * torch.einsum("bhqd,hcd->bhqc", qf, cc.float())
    if csp is not None:
        coarse_logits = coarse_logits + half_qn2 * csp.view(1, hk, 1, ncc)
    coarse_probs = ref_lookup._per_key_probs(coarse_logits, cls, fixed)
    if coarse_keep is None:
        return None, coarse_probs
    parent = ref_lookup._fine_parent(co, cf)
    allowed = coarse_keep.gather(-1, parent.unsqueeze(0).expand(b, hk, cf))
    extra = torch.logsumexp(torch.where(~coarse_keep.unsqueeze(2), coarse_logits + cls, float("-inf")), dim=-1)
    if fixed is not None:
        extra = torch.logaddexp(extra, fixed)
    masked = torch.where(allowed.unsqueeze(2), fine_logits, float("-inf"))
    return ref_lookup._per_key_probs(masked, fls, extra), coarse_probs


def estimate_terms(q, fc, ccent, gen):
    """Random cluster spreads (per-dimension variances) and always-attended log-normalisers for a case."""
    b, hk, nq, _ = q.shape
    fsp = (0.05 + 0.5 * torch.rand(fc.shape[:2], generator=gen)).to(DEV)
    csp = (0.2 + 0.8 * torch.rand(ccent.shape[:2], generator=gen)).to(DEV)
    fixed = (2.0 + 3.0 * torch.randn(b, hk, nq, generator=gen)).to(DEV)
    return fsp, csp, fixed


def midpoint_threshold(probs: torch.Tensor, frac: float, min_gap: float = 1e-3) -> torch.Tensor:
    """[B, Hk, C] -> [Hk]: per head, a threshold halfway between two neighbouring distinct probabilities
    near the ``frac`` quantile, chosen where their relative gap is widest so rounding cannot flip a decision."""
    b, hk, c = probs.shape
    out = []
    for h in range(hk):
        vals = probs[:, h].flatten().double().unique().sort().values
        vals = vals[vals > 0]
        if len(vals) < 2:
            out.append(float(vals[0]) / 2 if len(vals) else 0.5)
            continue
        mid = int(frac * (len(vals) - 1))
        lo, hi = max(0, mid - 4), min(len(vals) - 1, mid + 4)
        gaps = (vals[lo + 1: hi + 1] - vals[lo:hi]) / vals[lo + 1: hi + 1]
        i = lo + int(gaps.argmax())
        assert float(gaps.max()) > min_gap, "no safe threshold; change the seed"
        out.append(float(vals[i] + vals[i + 1]) / 2)
    return torch.tensor(out, dtype=torch.float32, device=probs.device)


def threshold_selection(q, fc, fs, ccent, cs, co, scale, hier, terms=None, coarse_frac=0.5, fine_frac=0.6,
                        min_gap=1e-3):
    """Thresholds halfway between neighbouring reference probabilities (so rounding cannot flip a decision):
    ((fine_thr, coarse_thr, None, None), reference fine probabilities, reference coarse ones or None)."""
    hk = fc.shape[0]
    cprobs = cthr = coarse_keep = None
    if hier:
        _, cprobs = _ref_probs(q, fc, fs, ccent, cs, co, scale, terms=terms)
        cthr = midpoint_threshold(cprobs, coarse_frac, min_gap)
        coarse_keep = cprobs >= cthr.view(1, hk, 1)
    fprobs, _ = _ref_probs(q, fc, fs, ccent if hier else None, cs, co, scale, coarse_keep=coarse_keep, terms=terms)
    return (midpoint_threshold(fprobs, fine_frac, min_gap), cthr, None, None), fprobs, cprobs


def make_lookup_case(b, hk, nq, d, n, cc, dt, seed, cent_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    sink, window = 2, 5
    fo, fs, co, cs = make_layout(hk, n, sink, window, cc, gen)
    keys = clustered_keys(hk, n, d, fo, gen)
    fc, ccent = (c.to(cent_dtype) for c in make_centroids(keys, fo, fs, co, cs))
    q = (2.0 * torch.randn(b, hk, nq, d, generator=gen)).to(DTYPES[dt])
    to = lambda *xs: [x.to(DEV) for x in xs]  # noqa: E731
    return to(q, fc, fs, ccent, cs, co, fo, keys), (sink, window, n)


LOOKUP_CASES = [  # b, hk, Q, D, N, Cc, query dtype, centroid dtype, hierarchical
    pytest.param(1, 2, 4, 64, 400, 4, "bf16", "fp32", True, id="decode-B1-G4-D64-bf16-hier"),
    pytest.param(2, 2, 1, 128, 500, 5, "fp32", "fp32", True, id="decode-B2-G1-D128-fp32-hier"),
    pytest.param(2, 2, 4, 128, 400, 4, "bf16", "bf16", True, id="decode-B2-G4-D128-bf16-hier-bf16centroids"),
    pytest.param(2, 1, 24, 64, 450, 3, "fp16", "fp32", True, id="prefill-B2-Q24-D64-fp16-hier"),
    pytest.param(1, 2, 37, 128, 400, 4, "bf16", "fp32", True, id="prefill-B1-Q37-D128-bf16-hier"),
    pytest.param(2, 2, 3, 64, 300, 3, "fp32", "fp32", False, id="decode-B2-Q3-D64-fp32-flat"),
    pytest.param(1, 1, 20, 128, 350, 3, "bf16", "bf16", False, id="prefill-B1-Q20-D128-bf16-flat-bf16centroids"),
    pytest.param(1, 1, 300, 64, 300, 3, "fp32", "fp32", True, id="prefill-B1-Q300-D64-fp32-hier-querychunks"),
]


@pytest.mark.parametrize("b,hk,nq,d,n,cc,dt,cdt,hier", LOOKUP_CASES)
def test_lookup_threshold_matches_ref(b, hk, nq, d, n, cc, dt, cdt, hier):
    (q, fc, fs, ccent, cs, co, _, _), _ = make_lookup_case(b, hk, nq, d, n, cc, dt, seed=b * 31 + nq + d + cc,
                                                           cent_dtype=DTYPES[cdt])
    scale = d ** -0.5
    sel, fprobs, cprobs = threshold_selection(q, fc, fs, ccent, cs, co, scale, hier)
    args = (q, fc, fs, ccent, cs, co, *sel, scale, hier)
    keep, read = centroid_lookup(*args)
    rkeep, rread = ref.centroid_lookup_ref(*args)
    assert keep.dtype == torch.bool and read.dtype == torch.int64
    assert torch.equal(keep, rkeep), f"{int((keep != rkeep).sum())} keep decisions differ"
    assert torch.equal(read, rread)
    assert 0 < int(keep.sum()) < keep.numel()
    probs, coarse_probs = centroid_probs(*args)
    assert rel_rms(probs, fprobs) < 1e-5
    if hier:
        assert rel_rms(coarse_probs, cprobs) < 1e-5


def _assert_budget_equal(keep, rkeep, probs):
    """Budget decisions equal, except that clusters of (near-)equal probability may swap at the cut."""
    diff = keep != rkeep
    if not diff.any():
        return
    for bi, h in {(int(x), int(y)) for x, y, _ in diff.nonzero().tolist()}:
        p = probs[bi, h]
        cut = p[rkeep[bi, h]].min()
        assert torch.allclose(p[diff[bi, h]], cut.expand(int(diff[bi, h].sum())), rtol=1e-4), "budget mismatch"


@pytest.mark.parametrize("b,hk,nq,d,n,cc,dt,cdt,hier", LOOKUP_CASES)
def test_lookup_budget_matches_ref(b, hk, nq, d, n, cc, dt, cdt, hier):
    (q, fc, fs, ccent, cs, co, _, _), _ = make_lookup_case(b, hk, nq, d, n, cc, dt, seed=7 + b + nq + d,
                                                           cent_dtype=DTYPES[cdt])
    scale = d ** -0.5
    total = fs.sum(1).float()  # [Hk]
    gen = torch.Generator().manual_seed(nq)
    frac = 0.1 + 0.3 * torch.rand(b, hk, generator=gen).to(DEV)
    budget = frac * total
    coarse_budget = (3 * frac).clamp(max=1.0) * total
    args = (q, fc, fs, ccent, cs, co, None, None, budget, coarse_budget, scale, hier)
    keep, read = centroid_lookup(*args)
    rkeep, rread = ref.centroid_lookup_ref(*args)
    probs, _ = centroid_probs(*args)
    _assert_budget_equal(keep, rkeep, probs)
    assert torch.equal(read, rread)
    kept = (keep * fs.unsqueeze(0)).sum(-1).float()
    if not hier:  # hierarchical mode can be capped by the coarse budget
        assert (kept >= budget).all()


ESTIMATE_CASES = [LOOKUP_CASES[i] for i in (0, 3, 5, 6, 7)]


@pytest.mark.parametrize("mode", ["threshold", "budget"])
@pytest.mark.parametrize("b,hk,nq,d,n,cc,dt,cdt,hier", ESTIMATE_CASES)
def test_lookup_estimate_terms_match_ref(b, hk, nq, d, n, cc, dt, cdt, hier, mode):
    """Variance term and exact always-attended normaliser: Triton = reference = the formula written out."""
    (q, fc, fs, ccent, cs, co, _, _), _ = make_lookup_case(b, hk, nq, d, n, cc, dt, seed=11 + b + nq + d,
                                                           cent_dtype=DTYPES[cdt])
    scale = d ** -0.5
    fsp, csp, fixed = estimate_terms(q, fc, ccent, torch.Generator().manual_seed(nq + d))
    terms = (fsp, csp, fixed)
    kw = dict(fine_spread=fsp, coarse_spread=csp, fixed_logz=fixed)
    if mode == "threshold":
        sel, fprobs, _ = threshold_selection(q, fc, fs, ccent, cs, co, scale, hier, terms=terms)
    else:
        total = fs.sum(1).float().expand(b, hk)
        sel = (None, None, 0.2 * total, 0.6 * total)
    args = (q, fc, fs, ccent, cs, co, *sel, scale, hier)
    keep, read = centroid_lookup(*args, **kw)
    rkeep, rread = ref.centroid_lookup_ref(*args, **kw)
    probs, _ = centroid_probs(*args, **kw)
    if mode == "threshold":
        assert torch.equal(keep, rkeep), f"{int((keep != rkeep).sum())} keep decisions differ"
        assert rel_rms(probs, fprobs) < 1e-5
        assert 0 < int(keep.sum()) < keep.numel()
    else:
        _assert_budget_equal(keep, rkeep, probs)
    assert torch.equal(read, rread)
    plain, _ = centroid_probs(*args)  # the terms change the estimate
    assert rel_rms(plain, probs) > 1e-3


@pytest.mark.parametrize("b,hk,nq,n,sink,window,dt", [
    pytest.param(1, 2, 4, 300, 4, 64, "bf16", id="decode-G4-bf16"),
    pytest.param(2, 3, 37, 200, 3, 20, "fp32", id="prefill-Q37-fp32"),
    pytest.param(1, 1, 5, 10, 0, 3, "fp16", id="window-only"),
    pytest.param(1, 1, 2, 10, 2, 0, "fp32", id="sinks-only"),
    pytest.param(1, 2, 3, 10, 0, 0, "fp32", id="none"),
])
def test_always_logz_matches_ref(b, hk, nq, n, sink, window, dt):
    gen = torch.Generator().manual_seed(nq + n)
    q = torch.randn(b, hk, nq, 64, generator=gen).to(DTYPES[dt]).to(DEV)
    keys = (2 * torch.randn(hk, n, 64, generator=gen)).to(DTYPES[dt]).to(DEV)
    got = always_logz(q, keys, sink, window, 0.125)
    want = ref.always_logz_ref(q, keys, sink, window, 0.125)
    assert got.shape == want.shape and got.dtype == torch.float32
    if sink + window == 0:
        assert torch.isinf(got).all() and torch.isinf(want).all()
    else:
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("b,hk,c,frac,ties", [
    pytest.param(2, 3, 37, 0.3, False, id="ragged-C37"),
    pytest.param(1, 2, 1500, 0.1, False, id="C1500-two-blocks"),
    pytest.param(2, 1, 64, 0.5, True, id="tied-probabilities"),
    pytest.param(1, 2, 50, 0.0, False, id="target-zero"),
    pytest.param(1, 2, 50, 2.0, False, id="target-above-total"),
])
def test_budget_mask_matches_ref(b, hk, c, frac, ties):
    gen = torch.Generator().manual_seed(c + b)
    probs = torch.exp(-12 * torch.rand(b, hk, c, generator=gen))  # per-key probabilities over 5 decades
    if ties:
        probs = (probs * 8).round() / 8
    sizes = torch.randint(1, 30, (hk, c), generator=gen)
    allowed = torch.rand(b, hk, c, generator=gen) < 0.8
    target = frac * (sizes.unsqueeze(0) * allowed).sum(-1).float()
    probs, sizes, allowed, target = (x.to(DEV) for x in (probs, sizes, allowed, target))
    keep = budget_mask(probs, sizes, allowed, target)
    rkeep = ref.budget_mask_ref(probs, sizes, allowed, target)
    assert keep.dtype == torch.bool and keep.shape == rkeep.shape
    assert not (keep & ~allowed).any()
    _assert_budget_equal(keep, rkeep, probs)
    kept = (keep * sizes.unsqueeze(0)).sum(-1).float()
    total = (allowed * sizes.unsqueeze(0)).sum(-1).float()
    assert (kept >= torch.minimum(target, total)).all()
    seglen = torch.full((b, hk, c + 2), -1, dtype=torch.int32, device=DEV)  # the lookup's positions input
    assert torch.equal(budget_mask(probs, sizes, allowed, target, seglen=seglen, sink=3, window=5), keep)
    assert torch.equal(seglen[..., 1:-1].long(), torch.where(keep, sizes.unsqueeze(0), 0))
    assert (seglen[..., 0] == 3).all() and (seglen[..., -1] == 5).all()
    everything = torch.ones_like(allowed)
    assert torch.equal(budget_mask(probs, sizes, None, target), budget_mask(probs, sizes, everything, target))


@pytest.mark.parametrize("b,hk,cc,cf,frac", [
    pytest.param(1, 2, 5, 37, 0.5, id="half"),
    pytest.param(2, 3, 9, 120, 0.2, id="B2-few-kept"),
    pytest.param(1, 1, 4, 30, 0.0, id="none-kept"),
    pytest.param(1, 2, 6, 70, 1.0, id="all-kept"),
])
def test_compact_fine_matches_ref(b, hk, cc, cf, frac):
    gen = torch.Generator().manual_seed(cc * cf)
    offs = []
    for _ in range(hk):  # ragged, some coarse clusters empty
        cuts = torch.randint(0, cf + 1, (cc - 1,), generator=gen).sort().values
        offs.append(torch.cat([torch.tensor([0]), cuts, torch.tensor([cf])]))
    coff = torch.stack(offs).to(DEV)
    keep_c = (torch.rand(b, hk, cc, generator=gen) < frac).to(DEV)
    probs = torch.full((b, hk, cf), 7.0, device=DEV)
    idx, count, allowed = compact_fine(keep_c, coff, cf, probs)
    rlists, rcount, rallowed = ref.compact_fine_ref(keep_c, coff, cf)
    assert torch.equal(count.cpu(), rcount.cpu())
    assert torch.equal(allowed.cpu(), rallowed.cpu())
    for i in range(b):
        for h in range(hk):
            assert torch.equal(idx[i, h, : int(count[i, h])].cpu(), rlists[i][h].cpu())
    assert torch.equal((probs == 0).cpu(), (rallowed == 0).cpu())  # zeroed exactly outside kept parents


def test_always_logz_ref_is_logsumexp_over_sinks_and_window():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 4, 16, generator=gen)
    keys = torch.randn(3, 40, 16, generator=gen)
    got = ref.always_logz_ref(q, keys, 3, 5, 0.25)
    idx = list(range(3)) + list(range(35, 40))
    want = torch.logsumexp(0.25 * torch.einsum("bhqd,hkd->bhqk", q, keys[:, idx]), dim=-1)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.isinf(ref.always_logz_ref(q, keys, 0, 0, 0.25)).all()


def test_lookup_rejects_both_modes():
    (q, fc, fs, ccent, cs, co, _, _), _ = make_lookup_case(1, 1, 2, 64, 200, 2, "fp32", seed=3)
    thr = torch.full((1,), 0.01, device=DEV)
    with pytest.raises(ValueError, match="exactly one"):
        centroid_lookup(q, fc, fs, ccent, cs, co, thr, thr, torch.ones(1, 1, device=DEV), None, 0.1)


# ----------------------------------------------------------------------------------------------- lookup -> attention


@pytest.mark.parametrize("nq", [pytest.param(4, id="decode-Q4"), pytest.param(40, id="prefill-Q40")])
def test_coarse_budget_covering_everything_is_the_flat_lookup(nq):
    """The identity ``selection`` uses to skip the coarse level: a coarse budget of every clustered key keeps
    every coarse cluster, so the decisions are the flat lookup's; and the flat Triton lookup with the
    always-attended row in its own launch matches the reference given ``always_logz_ref``."""
    b, hk, d, n = 2, 2, 64, 400
    (q, fc, fs, ccent, cs, co, fo, keys), (sink, window, _) = make_lookup_case(b, hk, nq, d, n, 5, "fp32", 21)
    scale = d ** -0.5
    total = fs.sum(1).float().expand(b, hk)
    fixed = ref.always_logz_ref(q, keys, sink, window, scale)
    hier = ref.centroid_lookup_ref(q, fc, fs, ccent, cs, co, None, None, 0.15 * total, total.clone(), scale, True,
                                   fixed_logz=fixed)[0]
    flat_args = (q, fc, fs, ccent, cs, co, None, None, 0.15 * total, None, scale, False)
    flat, rread = ref.centroid_lookup_ref(*flat_args, fixed_logz=fixed)
    assert torch.equal(hier, flat)
    keep, read, pos, tot = centroid_lookup_positions(*flat_args, fine_offsets=fo, num_tokens=n,
                                                     sink_tokens=sink, window_tokens=window,
                                                     always_keys=(keys, sink, window))
    probs, _ = centroid_probs(*flat_args, always_keys=(keys, sink, window))
    _assert_budget_equal(keep, flat, probs)
    assert torch.equal(read, rread)




@pytest.mark.parametrize("always", [pytest.param(False, id="plain"), pytest.param(True, id="always-in-kernel")])
@pytest.mark.parametrize("mode", [pytest.param("threshold", id="threshold"), pytest.param("budget", id="budget")])
@pytest.mark.parametrize("g,t,hier", [pytest.param(4, 1, True, id="decode-G4"),
                                      pytest.param(4, 1, False, id="decode-G4-flat"),
                                      pytest.param(1, 1, False, id="decode-G1-flat"),
                                      pytest.param(2, 6, True, id="prefill-G2-T6"),
                                      pytest.param(2, 12, True, id="prefill-G2-T12-many-query-path")])
def test_lookup_positions_then_attention(mode, g, t, hier, always):
    """Positions of the kept keys, then attention over them; ``always``: the always-attended keys' normaliser
    computed inside the first launch (``always_keys``) against the reference given ``always_logz_ref``. The flat
    cases have more segments than one positions block (threshold: ``decide_from_logits`` block sums)."""
    b, hk, d, n = 2, 2, 64, (360 if hier else 1200)
    (q4, fc, fs, ccent, cs, co, fo, keys), (sink, window, _) = make_lookup_case(b, hk, g * t, d, n, 4, "fp32", 11)
    q = q4.reshape(b, hk * g, t, d)
    values = torch.randn_like(keys)
    scale = d ** -0.5
    if mode == "threshold":
        sel, _, _ = threshold_selection(q4, fc, fs, ccent, cs, co, scale, hier, coarse_frac=0.4, fine_frac=0.5)
    else:
        total = fs.sum(1).float().expand(b, hk)
        sel = (None, None, 0.2 * total, 0.6 * total if hier else None)
    args = (q4, fc, fs, ccent, cs, co, *sel, scale, hier)
    kw = dict(always_keys=(keys, sink, window)) if always else {}
    rkw = dict(fixed_logz=ref.always_logz_ref(q4, keys, sink, window, scale)) if always else {}
    keep, read, pos, total = centroid_lookup_positions(*args, fine_offsets=fo, num_tokens=n, sink_tokens=sink,
                                                       window_tokens=window, **kw)
    rkeep, rread = ref.centroid_lookup_ref(*args, **rkw)
    if always:  # same estimate as with the term given, and not the plain one
        p_in, c_in = centroid_probs(*args, **kw)
        p_given, c_given = centroid_probs(*args, **rkw)
        assert rel_rms(p_in, p_given) < 1e-5
        if hier:
            assert rel_rms(c_in, c_given) < 1e-5 and rel_rms(centroid_probs(*args)[1], c_in) > 1e-3
        else:
            assert rel_rms(centroid_probs(*args)[0], p_in) > 1e-3
    assert torch.equal(keep, rkeep) and torch.equal(read, rread)
    kept = torch.cat([torch.arange(sink), torch.arange(n - window, n)]).to(DEV)
    for bi in range(b):
        for h in range(hk):
            mid = [torch.arange(int(fo[h, j]), int(fo[h, j + 1]), device=DEV) for j in keep[bi, h].nonzero().flatten()]
            want = torch.cat([kept[:sink], *mid, kept[sink:]])
            assert int(total[bi, h]) == want.numel()
            assert torch.equal(pos[bi, h, : want.numel()].long(), want)
    out, lse = sparse_attention_positions(q, keys, values, pos, total, scale, num_splits=2)
    s, e, c = ref.ranges_from_mask_ref(keep, fo, n, sink, window)
    rout, rlse = ref.sparse_attention_ref(q, keys, values, s, e, c, scale)
    _check_attention(out, lse, rout, rlse, c, g, attn_tol(torch.float32))


# ----------------------------------------------------------------------------------------------- merge, dispatch


@pytest.mark.parametrize("shape", [pytest.param((2, 3, 5, 64), id="B2-H3-T5-D64"),
                                   pytest.param((1, 4, 1, 128), id="B1-H4-T1-D128")])
def test_lse_merge_matches_ref(shape):
    gen = torch.Generator().manual_seed(shape[-1])
    oa, ob = (torch.randn(*shape, generator=gen).to(DEV) for _ in range(2))
    la, lb = (3 * torch.randn(*shape[:-1], generator=gen).to(DEV) for _ in range(2))
    la.view(-1)[::3] = float("-inf")  # empty first part
    lb.view(-1)[::4] = float("-inf")  # empty second part (both empty at multiples of 12)
    out, lse = lse_merge(oa, la, ob, lb)
    rout, rlse = ref.lse_merge_ref(oa, la, ob, lb)
    assert torch.isfinite(out).all()
    assert rel_rms(out, rout) < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    fin = torch.isfinite(rlse)
    assert torch.allclose(lse[fin], rlse[fin], atol=1e-5)


def test_dispatch_backends():
    t = get_ops("torch")
    assert t.backend == "torch" and t.centroid_lookup is ref.centroid_lookup_ref
    assert t.sparse_attention is ref.sparse_attention_ref and t.lse_merge is ref.lse_merge_ref
    tr = get_ops("triton")
    assert tr.centroid_lookup is centroid_lookup and tr.sparse_attention is sparse_attention
    assert tr.lse_merge is lse_merge and tr.ranges_from_mask is ref.ranges_from_mask_ref
    assert tr.causal_attention is ref.causal_attention_ref
    assert t.sparse_attention_with_new_tokens is ref.sparse_attention_with_new_tokens_ref
    assert tr.sparse_attention_with_new_tokens.__module__.endswith("kernels.fused_attention")
    assert get_ops("auto").backend == ("triton" if CUDA else "torch")
    with pytest.raises(ValueError, match="backend"):
        get_ops("cuda")


# ----------------------------------------------------------------------------------------------- GPU, real sizes


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("b,hk,g,t,d,dt", [
    pytest.param(1, 8, 4, 1, 128, "bf16", id="decode-llama3-B1"),
    pytest.param(2, 8, 4, 1, 128, "fp16", id="decode-llama3-B2-fp16"),
    pytest.param(1, 32, 1, 1, 128, "bf16", id="decode-llama2-B1"),
    pytest.param(1, 8, 4, 256, 128, "bf16", id="prefill-llama3-T256"),
    pytest.param(2, 4, 2, 100, 64, "fp32", id="prefill-B2-D64-fp32"),
])
def test_gpu_sparse_attention_real_sizes(b, hk, g, t, d, dt):
    n = 32768
    gen = torch.Generator().manual_seed(t + d + b)
    dtype = DTYPES[dt]
    fo, _, _, _ = make_layout(hk, n, 4, 64, 64, gen)
    keep = torch.rand(b, hk, fo.shape[1] - 1, generator=gen) < 0.1
    keep[-1, -1] = False
    s, e, c = ref.ranges_from_mask_ref(keep.to(DEV), fo.to(DEV), n, 4, 64)
    q = torch.randn(b, hk * g, t, d, device=DEV, dtype=dtype)
    keys = torch.randn(hk, n, d, device=DEV, dtype=dtype)
    values = torch.randn(hk, n, d, device=DEV, dtype=dtype)
    out, lse = sparse_attention(q, keys, values, s, e, c, d ** -0.5)
    rout, rlse = ref.sparse_attention_ref(q, keys, values, s, e, c, d ** -0.5)
    _check_attention(out, lse, rout, rlse, c, g, attn_tol(dtype))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("b,nq,hier,mode,cdt,terms", [
    pytest.param(1, 4, True, "threshold", "bf16", True, id="decode-hier-threshold-estimate-terms"),
    pytest.param(2, 4, True, "budget", "bf16", True, id="decode-hier-budget-estimate-terms"),
    pytest.param(1, 512, True, "threshold", "bf16", True, id="prefill-hier-threshold-estimate-terms"),
    pytest.param(1, 4, True, "threshold", "fp32", False, id="decode-hier-threshold"),
    pytest.param(2, 4, True, "budget", "fp32", False, id="decode-hier-budget"),
    pytest.param(1, 512, True, "threshold", "fp32", False, id="prefill-hier-threshold-fp32centroids"),
    pytest.param(1, 512, True, "threshold", "bf16", False, id="prefill-hier-threshold-bf16centroids-native-dot"),
    pytest.param(1, 2048, True, "budget", "bf16", False, id="prefill-hier-budget-bf16centroids-querychunks"),
    pytest.param(1, 4, True, "threshold", "bf16", False, id="decode-hier-threshold-bf16centroids"),
    pytest.param(1, 4, False, "threshold", "fp32", False, id="decode-flat-threshold"),
])
def test_gpu_lookup_real_sizes(b, nq, hier, mode, cdt, terms):
    hk, d, n = 8, 128, 32768
    (q, fc, fs, ccent, cs, co, _, _), _ = make_lookup_case(b, hk, nq, d, n, n // 256, "bf16", seed=nq + b,
                                                           cent_dtype=DTYPES[cdt])
    scale = d ** -0.5
    t = estimate_terms(q, fc, ccent, torch.Generator().manual_seed(nq)) if terms else None
    kw = dict(zip(("fine_spread", "coarse_spread", "fixed_logz"), t)) if terms else {}
    if mode == "threshold":
        sel, _, _ = threshold_selection(q, fc, fs, ccent, cs, co, scale, hier, terms=t, coarse_frac=0.7,
                                        fine_frac=0.9, min_gap=1e-4)
    else:
        total = fs.sum(1).float().expand(b, hk)
        sel = (None, None, 0.1 * total, 0.3 * total)
    args = (q, fc, fs, ccent, cs, co, *sel, scale, hier)
    keep, read = centroid_lookup(*args, **kw)
    rkeep, rread = ref.centroid_lookup_ref(*args, **kw)
    if mode == "threshold":
        assert torch.equal(keep, rkeep), f"{int((keep != rkeep).sum())} keep decisions differ"
    else:
        _assert_budget_equal(keep, rkeep, centroid_probs(*args, **kw)[0])
    assert torch.equal(read, rread)


def test_chain_launch_arguments(monkeypatch):
    """PDL launch arguments only for a CUDA device of compute capability 9.0 or newer, and only when on."""
    from sqattn_index.kernels import chain

    assert chain.chain_launch(torch.device("cpu")) == {}
    monkeypatch.setitem(chain.SETTINGS, "pdl", False)
    assert chain.chain_launch(torch.device(DEV)) == {}
    monkeypatch.setitem(chain.SETTINGS, "pdl", True)
    hopper = CUDA and os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.cuda.get_device_capability()[0] >= 9
    assert chain.chain_launch(torch.device(DEV)) == ({"PDL": 1, "launch_pdl": True} if hopper else {})


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("nq,hier,mode", [
    pytest.param(4, False, "threshold", id="decode-flat-threshold"),
    pytest.param(4, False, "budget", id="decode-flat-budget"),
    pytest.param(4, True, "threshold", id="decode-hier-threshold"),
    pytest.param(512, True, "threshold", id="prefill-hier-threshold"),
    pytest.param(512, True, "budget", id="prefill-hier-budget"),
])
def test_gpu_chain_in_graph_with_pdl_matches_plain_launches(monkeypatch, nq, hier, mode):
    """A whole squeezed step (lookup -> positions -> sparse attention -> split merge) captured in a CUDA graph
    with programmatic dependent launch gives bitwise the results of plain launches, replay after replay."""
    from sqattn_index.kernels import chain

    b, hk, d, n = 1, 8, 128, 32768
    (q, fc, fs, ccent, cs, co, fo, keys), (sink, window, _) = make_lookup_case(b, hk, nq, d, n, n // 256, "bf16",
                                                                               seed=nq + hier,
                                                                               cent_dtype=torch.bfloat16)
    keys = keys.to(torch.bfloat16)
    values = torch.randn_like(keys)
    scale = d ** -0.5
    if mode == "threshold":
        sel, _, _ = threshold_selection(q, fc, fs, ccent, cs, co, scale, hier, coarse_frac=0.7, fine_frac=0.9,
                                        min_gap=1e-4)
    else:
        total = fs.sum(1).float().expand(b, hk)
        sel = (None, None, 0.1 * total, 0.3 * total)
    kw = dict(fine_offsets=fo, num_tokens=n, sink_tokens=sink, window_tokens=window)
    g = 4 if nq == 4 else 8  # prefill: 8 query heads x 64 tokens per KV head
    qh = q.view(b, hk, g, nq // g, d).reshape(b, hk * g, nq // g, d)

    def step():
        _, _, pos, total = centroid_lookup_positions(q, fc, fs, ccent, cs, co, *sel, scale, hier, **kw)
        return (total,) + sparse_attention_positions(qh, keys, values, pos, total, scale)

    monkeypatch.setitem(chain.SETTINGS, "pdl", False)
    want = step()
    monkeypatch.setitem(chain.SETTINGS, "pdl", True)
    assert chain.chain_launch(q.device), "an H100/H200 should take PDL launches"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for x, y in zip(got, want):
            assert torch.equal(x, y)


def test_budget_positions_fallback_past_max_clusters(monkeypatch):
    """Heads with more clusters than the registers hold take the reference's sort; the positions, totals
    and centroid counts they return are the in-register path's."""
    from sqattn_index.kernels import budget as budget_mod

    b, hk, d, n = 1, 2, 64, 360
    (q, fc, fs, ccent, cs, co, fo, keys), (sink, window, _) = make_lookup_case(b, hk, 4, d, n, 4, "fp32", 5)
    total_keys = fs.sum(1).float().expand(b, hk)
    args = (q, fc, fs, ccent, cs, co, None, None, 0.2 * total_keys, 0.6 * total_keys, d ** -0.5, True)
    kw = dict(fine_offsets=fo, num_tokens=n, sink_tokens=sink, window_tokens=window)
    fast = centroid_lookup_positions(*args, **kw)
    monkeypatch.setattr(budget_mod, "MAX_CLUSTERS", 8)
    slow = centroid_lookup_positions(*args, **kw)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1]) and torch.equal(fast[3], slow[3])
    for bi in range(b):
        for h in range(hk):
            t = int(fast[3][bi, h])
            assert torch.equal(fast[2][bi, h, :t], slow[2][bi, h, :t])


@pytest.mark.parametrize("kway", [2, 8])
def test_budget_mask_multiway_search_matches_ref(monkeypatch, kway):
    """The search tests ``KWAY`` thresholds per round (a launch setting): same decisions as the reference."""
    from sqattn_index.kernels import budget as budget_mod

    monkeypatch.setattr(budget_mod, "KWAY", kway)
    gen = torch.Generator().manual_seed(kway)
    probs = torch.exp(-12 * torch.rand(2, 3, 300, generator=gen))
    sizes = torch.randint(1, 30, (3, 300), generator=gen)
    allowed = torch.rand(2, 3, 300, generator=gen) < 0.8
    target = 0.3 * (sizes.unsqueeze(0) * allowed).sum(-1).float()
    probs, sizes, allowed, target = (x.to(DEV) for x in (probs, sizes, allowed, target))
    keep = budget_mask(probs, sizes, allowed, target)
    _assert_budget_equal(keep, ref.budget_mask_ref(probs, sizes, allowed, target), probs)


@pytest.mark.parametrize("nq,with_fixed,c", [
    pytest.param(1, False, 300, id="Q1"),
    pytest.param(4, True, 300, id="Q4-fixed"),
    pytest.param(3, False, 37, id="Q3-ragged-C37"),
    pytest.param(4, True, 32000, id="Q4-fixed-C32000-512K", marks=[pytest.mark.gpu, gpu]),
])
def test_budget_from_logits_matches_probabilities_then_budget(monkeypatch, nq, with_fixed, c):
    """The decode lookup's fused path: probabilities from the stored logits and partial normalisers in the
    budget launch = the same formula in torch then ``budget_mask_ref``; the segment lengths and their prefix
    sums are written, and the sorted fallback (past MAX_CLUSTERS) returns the same."""
    from sqattn_index.kernels import budget as budget_mod
    from sqattn_index.kernels.positions import kept_positions

    gen = torch.Generator().manual_seed(nq + c)
    b, hk, nb = 2, 3, 5
    logits = 3 * torch.randn(b, hk, nq, c, generator=gen)
    parts = 4 + torch.randn(b, hk, nb, nq, generator=gen)
    parts[0, 0, 1] = float("-inf")  # an empty partial (a program with no clusters)
    fixed = torch.randn(b, hk, nq, generator=gen) if with_fixed else None
    sizes = torch.randint(1, 30, (hk, c), generator=gen)
    target = 0.2 * sizes.sum(-1).float().expand(b, hk).clone()
    logz = torch.logsumexp(parts, dim=2)
    if with_fixed:
        logz = torch.logaddexp(logz, fixed)
    want = torch.exp(logits - logz.unsqueeze(-1)).mean(dim=2)
    args = [x.to(DEV) if x is not None else None for x in (logits, parts, fixed, sizes, target)]
    outs = []
    for max_clusters in (budget_mod.MAX_CLUSTERS, 8):
        monkeypatch.setattr(budget_mod, "MAX_CLUSTERS", max_clusters)
        seglen = torch.full((b, hk, c + 2), -1, dtype=torch.int32, device=DEV)
        excl = torch.full_like(seglen, -1)
        keep, probs = budget_mod.budget_mask_from_logits(*args, seglen=seglen, sink=3, window=5, excl=excl)
        assert torch.allclose(probs.cpu(), want, rtol=1e-5, atol=1e-12)
        _assert_budget_equal(keep, ref.budget_mask_ref(want.to(DEV), args[3], torch.ones_like(keep), args[4]), want)
        assert torch.equal(seglen[..., 1:-1].long(), torch.where(keep, args[3].unsqueeze(0), 0))
        assert (seglen[..., 0] == 3).all() and (seglen[..., -1] == 5).all()
        assert torch.equal(excl, torch.cumsum(seglen, dim=-1, dtype=torch.int32) - seglen)
        outs.append((keep, seglen, excl))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][2], outs[1][2])
    seglen, excl = outs[0][1], outs[0][2]
    lows = torch.cumsum(torch.full((hk, c + 2), 40, dtype=torch.int32), dim=1).to(DEV) - 40
    pos, total, _ = kept_positions(seglen, lows, 40 * (c + 2))
    pos2, total2, _ = kept_positions(seglen, lows, 40 * (c + 2), excl=excl)  # prefix sums given
    assert torch.equal(total, total2) and torch.equal(total.long(), seglen.sum(-1))
    for bi in range(b):
        for h in range(hk):
            t = int(total[bi, h])
            assert torch.equal(pos[bi, h, :t], pos2[bi, h, :t])
    with pytest.raises(ValueError, match="parts must be"):
        budget_mod.budget_mask_from_logits(args[0], args[1][:, :1], None, args[3], args[4])
    with pytest.raises(ValueError, match="excl must have"):
        kept_positions(seglen, lows, 40 * (c + 2), excl=excl[..., :-1])


@pytest.mark.parametrize("slack", [1 / 128, 0.05, 0.5])
def test_budget_mask_slack_keeps_a_bounded_superset(slack):
    """With slack the search may stop early: the kept clusters contain the exact selection, are a prefix of
    the probability order (every kept cluster outranks every dropped one), and hold at most
    (1 + slack) x target keys unless the exact selection already does more."""
    gen = torch.Generator().manual_seed(int(slack * 1000))
    b, hk, c = 2, 3, 500
    probs = torch.exp(-10 * torch.rand(b, hk, c, generator=gen))
    sizes = torch.randint(1, 30, (hk, c), generator=gen)
    allowed = torch.rand(b, hk, c, generator=gen) < 0.9
    target = 0.1 * (sizes.unsqueeze(0) * allowed).sum(-1).float()
    probs, sizes, allowed, target = (x.to(DEV) for x in (probs, sizes, allowed, target))
    keep = budget_mask(probs, sizes, allowed, target, slack=slack).cpu()
    exact = ref.budget_mask_ref(probs, sizes, allowed, target).cpu()
    probs, sizes, allowed, target = probs.cpu(), sizes.cpu(), allowed.cpu(), target.cpu()
    assert not (keep & ~allowed).any()
    assert (keep | ~exact).all()  # superset of the exact selection
    kept = (keep * sizes.unsqueeze(0)).sum(-1).float()
    exact_kept = (exact * sizes.unsqueeze(0)).sum(-1).float()
    assert (kept <= torch.maximum((1 + slack) * target, exact_kept)).all()
    if slack >= 0.5:  # this seed: the search stops early on some head (a real superset)
        assert (kept > exact_kept).any()
    for bi in range(b):
        for h in range(hk):
            k, a = keep[bi, h], allowed[bi, h]
            if k.any() and (a & ~k).any():
                assert probs[bi, h][k].min() >= probs[bi, h][a & ~k].max()
    with pytest.raises(ValueError, match="slack must be"):
        budget_mask(probs.to(DEV), sizes.to(DEV), allowed.to(DEV), target.to(DEV), slack=-0.1)


def test_threshold_decide_matches_torch():
    """The many-query lookup's one-launch threshold decisions: keep, allowed and kept segment lengths."""
    from sqattn_index.kernels.compaction import threshold_decide, write_seglen

    gen = torch.Generator().manual_seed(3)
    b, hk, c = 2, 3, 300
    probs = torch.rand(b, hk, c, generator=gen).to(DEV)
    thr = torch.tensor([0.2, 0.5, 0.9]).to(DEV)
    sizes = torch.randint(1, 40, (hk, c), generator=gen).to(DEV)
    allowed = (torch.rand(b, hk, c, generator=gen) < 0.7).to(torch.uint8).to(DEV)
    seglen = torch.full((b, hk, c + 2), -1, dtype=torch.int32, device=DEV)
    keep = threshold_decide(probs, thr, sizes, allowed, seglen, sink=4, window=9)
    want = (probs >= thr.view(1, -1, 1)) & allowed.bool()
    assert keep.dtype == torch.bool and torch.equal(keep, want)
    ref_seg = torch.empty_like(seglen)
    write_seglen(ref_seg, want, sizes, 4, 9)
    assert torch.equal(seglen, ref_seg)
    assert torch.equal(threshold_decide(probs, thr), probs >= thr.view(1, -1, 1))
    with pytest.raises(ValueError, match="needs sizes"):
        threshold_decide(probs, thr, None, None, seglen)
    with pytest.raises(ValueError, match="one value per KV head"):
        threshold_decide(probs, thr[:1])
    # any strides: a transposed view of the same values decides the same
    probs_t = probs.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(threshold_decide(probs_t, thr, sizes, allowed.bool()), want)


@pytest.mark.parametrize("nq,with_fixed,c", [pytest.param(1, False, 300, id="Q1-C300"),
                                             pytest.param(3, True, 300, id="Q3-fixed-C300"),
                                             pytest.param(16, False, 61, id="Q16-C61"),
                                             pytest.param(2, False, 7, id="Q2-C7")])
def test_decide_from_logits_matches_ref_and_feeds_positions(nq, with_fixed, c):
    """Flat decode decisions from stored logits: probabilities, keep, kept segment lengths and per-block kept
    sums as the reference; the positions kernel then gives the same positions from the block sums as from a
    full re-read of the segment lengths."""
    from sqattn_index.kernels.decide import decide_from_logits
    from sqattn_index.kernels.positions import kept_positions, segment_block

    gen = torch.Generator().manual_seed(nq * 100 + c)
    b, hk, sink, window = 2, 3, 4, 9
    logits = (3.0 * torch.randn(b, hk, nq, c, generator=gen)).to(DEV)
    sizes = torch.randint(1, 30, (hk, c), generator=gen).to(DEV)
    # partial log-normalisers of two halves of the clusters, as the lse launch leaves them
    halves = (logits + sizes.float().log().view(1, hk, 1, c)).split((c + 1) // 2, dim=-1)
    parts = torch.stack([x.logsumexp(-1) for x in halves], dim=2)  # [B, Hk, 2, Q]
    fixed = (torch.randn(b, hk, nq, generator=gen) + 2.0).to(DEV) if with_fixed else None
    rprobs, _ = ref.decide_from_logits_ref(logits, parts, torch.zeros(hk, device=DEV), sizes, fixed_logz=fixed)
    thr = midpoint_threshold(rprobs, 0.6, min_gap=1e-4)
    nblk = -(-(c + 2) // segment_block())
    seglen = torch.full((b, hk, c + 2), -1, dtype=torch.int32, device=DEV)
    blocksum = torch.full((b, hk, nblk), -1, dtype=torch.int32, device=DEV)
    probs, keep = decide_from_logits(logits, parts, thr, sizes, fixed_logz=fixed, seglen=seglen, blocksum=blocksum,
                                     sink=sink, window=window)
    rseg, rsum = torch.empty_like(seglen), torch.empty_like(blocksum)
    rprobs, rkeep = ref.decide_from_logits_ref(logits, parts, thr, sizes, fixed_logz=fixed, seglen=rseg,
                                               blocksum=rsum, sink=sink, window=window)
    assert rel_rms(probs, rprobs) < 1e-5
    assert keep.dtype == torch.bool and torch.equal(keep, rkeep) and 0 < int(keep.sum()) < keep.numel()
    assert torch.equal(seglen, rseg) and torch.equal(blocksum, rsum)
    assert int(seglen[0, 0, 0]) == sink and int(seglen[0, 0, -1]) == window
    # positions from the block sums equal those from re-reading every earlier segment length
    n = int(sizes.sum(1).max()) + sink + window
    starts = sink + sizes.cumsum(1) - sizes  # first position of each cluster
    lows = torch.cat([torch.zeros(hk, 1, dtype=torch.int64, device=DEV), starts,
                      torch.full((hk, 1), n - window, dtype=torch.int64, device=DEV)], dim=1).to(torch.int32)
    pos, total, read = kept_positions(seglen, lows, n, blocksum=blocksum, num_coarse=c)
    rpos, rtotal, _ = kept_positions(seglen, lows, n)
    assert torch.equal(read, torch.full_like(read, c))  # no allowed mask: the centroids scored are num_coarse
    assert torch.equal(total, rtotal) and torch.equal(total, seglen.sum(-1, dtype=torch.int32))
    for bi in range(b):
        for h in range(hk):
            k = int(total[bi, h])
            want = torch.cat([torch.arange(int(lows[h, r]), int(lows[h, r]) + int(seglen[bi, h, r]))
                              for r in range(c + 2)]).to(DEV)
            assert torch.equal(pos[bi, h, :k].long(), want) and torch.equal(rpos[bi, h, :k], pos[bi, h, :k])
    with pytest.raises(ValueError, match="together"):
        decide_from_logits(logits, parts, thr, sizes, seglen=seglen)
    with pytest.raises(ValueError, match="parts must be"):
        decide_from_logits(logits, parts[:, :, :, :1] if nq > 1 else parts[:1], thr, sizes)
    with pytest.raises(ValueError, match="blocksum must be"):
        kept_positions(seglen, lows, n, blocksum=blocksum[..., :1] if nblk > 1 else blocksum[:1])
    with pytest.raises(ValueError, match="blocksum must be int32"):
        kept_positions(seglen, lows, n, blocksum=blocksum.long())
    with pytest.raises(ValueError, match="seglen must be contiguous int32"):
        decide_from_logits(logits, parts, thr, sizes, seglen=seglen.long(), blocksum=blocksum)


@pytest.mark.parametrize("nq,n,always", [pytest.param(1, 1200, False, id="Q1"),
                                         pytest.param(4, 1200, True, id="Q4-always"),
                                         pytest.param(4, 32768, True, id="Q4-always-32K", marks=[pytest.mark.gpu, gpu]),
                                         pytest.param(1, 32768, False, id="Q1-32K", marks=[pytest.mark.gpu, gpu])])
def test_decide_from_logits_equals_the_probability_launch(nq, n, always):
    """Same logits and partials in: the one-launch decisions give the decisions of the general probability
    launch (``_prob_kernel``) that the flat decode path used before, and its probabilities bit for bit with one
    query (with several, the GPU compiles exp(logit - log Z) and the sum over queries into another instruction
    order: within 1e-5 relative, e.g. 2.6e-6 seen at 4 queries, far below the gap around the thresholds)."""
    from sqattn_index.kernels.decide import decide_from_logits
    from sqattn_index.kernels.lookup import _Level

    b, hk, d = 2, 2, 64
    (q, fc, fs, ccent, cs, co, _, keys), (sink, window, _) = make_lookup_case(b, hk, nq, d, n, 4, "fp32", n + nq)
    scale = d ** -0.5
    (thr, _, _, _), _, _ = threshold_selection(q, fc, fs, ccent, cs, co, scale, False, fine_frac=0.7)
    fine = _Level(q, fc, fs, scale, "ieee", flat_fine=True)
    part, _, logits = fine.lse(always=(keys, sink, window) if always else None)
    probs_old, keep_old, _ = fine.probs([part], thr=thr, logits=logits)
    probs_new, keep_new = decide_from_logits(logits, part, thr, fs)
    assert torch.equal(keep_new, keep_old.view(torch.bool)) and 0 < int(keep_new.sum()) < keep_new.numel()
    if nq == 1 or not CUDA:
        assert torch.equal(probs_new, probs_old)
    else:
        rel = ((probs_new - probs_old).abs() / probs_old.abs().clamp_min(1e-30)).max()
        assert float(rel) <= 1e-5, f"max relative difference {float(rel):.3g}"
