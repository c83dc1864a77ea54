"""8-bit centroid tables: quantisation, and the Triton lookup on them against the reference on the
dequantised table (``kernels/centroid_fp8.py``). Runs under the interpreter on CPU, real kernels on CUDA."""

import pytest
import torch

from test_kernels import (  # noqa: F401  (sets TRITON_INTERPRET before any kernel is defined)
    DEV,
    _assert_budget_equal,
    make_lookup_case,
    rel_rms,
    threshold_selection,
)

from sqattn_index.kernels import reference as ref
from sqattn_index.kernels.centroid_fp8 import FP8, FP8_MAX, dequantize_centroids, quantize_centroids
from sqattn_index.kernels.lookup import centroid_lookup, centroid_lookup_positions, centroid_probs

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


def test_quantize_round_trip_per_dimension():
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(3, 50, 16, generator=gen)
    c[:, :, 2] *= 300.0  # an outlier channel
    c[:, :, 5] *= 1e-3  # a tiny one: a per-head scale would flush it to zero
    c[1, :, 7] = 0.0  # an all-zero channel
    table, scales = quantize_centroids(c)
    assert table.dtype == FP8 and scales.shape == (3, 16) and scales.dtype == torch.float32
    assert float(table.float().abs().amax()) <= FP8_MAX
    assert torch.equal(scales, torch.exp2(torch.log2(scales).round()))  # powers of two: folded into q exactly
    top = table.float().abs().amax(dim=1)[c.abs().amax(dim=1) > 0]
    assert bool(((top > FP8_MAX / 2) & (top <= FP8_MAX)).all())  # every dimension uses the top binade
    back = dequantize_centroids(table, scales)
    rel = (back - c).abs() / c.abs().clamp_min(1e-30)
    big = c.abs() > 0.05 * c.abs().amax(dim=1, keepdim=True)  # normal range of e4m3: 3 mantissa bits
    assert float(rel[big].max()) <= 2 ** -4 + 1e-6
    assert rel_rms(back[:, :, 5], c[:, :, 5]) < 0.05
    assert torch.equal(back[1, :, 7], torch.zeros(50))


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[Hk, C, D\]"):
        quantize_centroids(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_centroids(torch.full((1, 2, 4), float("nan")))
    table, scales = quantize_centroids(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="fp32 scales"):
        dequantize_centroids(table, scales[:1])


def _case(b, hk, nq, d, n, cc, seed, dt="bf16"):
    (q, fc, fs, ccent, cs, co, fo, keys), layout = make_lookup_case(b, hk, nq, d, n, cc, dt, seed=seed)
    f8, fsc = quantize_centroids(fc)
    c8, csc = quantize_centroids(ccent)
    # the reference's numbers are those of the dequantised tables
    fdq, cdq = dequantize_centroids(f8, fsc), dequantize_centroids(c8, csc)
    return (q, fs, cs, co, fo, keys), (f8, fsc, c8, csc), (fdq, cdq), layout


FP8_CASES = [  # b, hk, Q, D, N, Cc, hierarchical, query dtype (bf16 with Q >= 2: the native dot on a GPU)
    pytest.param(1, 2, 4, 64, 400, 4, False, "bf16", id="decode-G4-D64-flat"),
    pytest.param(2, 2, 1, 128, 500, 5, False, "bf16", id="decode-G1-D128-flat"),
    pytest.param(2, 2, 4, 128, 400, 4, True, "bf16", id="decode-G4-D128-hier"),
    pytest.param(1, 2, 4, 64, 400, 4, False, "fp16", id="decode-G4-D64-flat-fp16"),
    pytest.param(1, 2, 24, 64, 450, 3, True, "bf16", id="prefill-Q24-hier-many-query-path"),
]


@pytest.mark.parametrize("mode", ["threshold", "budget"])
@pytest.mark.parametrize("b,hk,nq,d,n,cc,hier,dt", FP8_CASES)
def test_lookup_on_fp8_centroids_matches_ref(b, hk, nq, d, n, cc, hier, dt, mode):
    (q, fs, cs, co, _, _), (f8, fsc, c8, csc), (fdq, cdq), _ = _case(b, hk, nq, d, n, cc, 5 + nq + d + b, dt)
    scale = d ** -0.5
    if mode == "threshold":
        sel, fprobs, _ = threshold_selection(q, fdq, fs, cdq, cs, co, scale, hier)
    else:
        total = fs.sum(1).float().expand(b, hk)
        sel = (None, None, 0.25 * total, 0.7 * total if hier else None)
    kw = dict(fine_centroid_scales=fsc, coarse_centroid_scales=csc)
    args8 = (q, f8, fs, c8, cs, co, *sel, scale, hier)
    keep, read = centroid_lookup(*args8, **kw)
    rkeep, rread = ref.centroid_lookup_ref(*args8, **kw)
    dkeep, _ = ref.centroid_lookup_ref(q, fdq, fs, cdq, cs, co, *sel, scale, hier)
    assert torch.equal(rkeep, dkeep)  # the reference scores the dequantised table
    probs, _ = centroid_probs(*args8, **kw)
    if mode == "threshold":
        assert torch.equal(keep, rkeep), f"{int((keep != rkeep).sum())} keep decisions differ"
        assert rel_rms(probs, fprobs) < 1e-5
        assert 0 < int(keep.sum()) < keep.numel()
    else:
        _assert_budget_equal(keep, rkeep, probs)
    assert torch.equal(read, rread)


@pytest.mark.parametrize("hier,nq", [(False, 4), (True, 4), (True, 24)],
                         ids=["decode-flat", "decode-hier", "prefill-hier-many-query-path"])
def test_fp8_positions_with_always_keys_in_the_launch(hier, nq):
    """16-bit keys scored for the always-attended normaliser inside the launch that reads an 8-bit table (or,
    with more than 16 queries, the many-query launches after the table is widened to bf16, exactly)."""
    b, hk, d, n = 2, 2, 64, 900
    (q, fs, cs, co, fo, keys), (f8, fsc, c8, csc), (fdq, cdq), (sink, window, _) = _case(b, hk, nq, d, n, 4, 17)
    scale = d ** -0.5
    keys = keys.to(q.dtype)  # as the engine stores them (other dtypes: a separate normaliser launch)
    sel, _, _ = threshold_selection(q, fdq, fs, cdq, cs, co, scale, hier, coarse_frac=0.4, fine_frac=0.5)
    kw = dict(fine_centroid_scales=fsc, coarse_centroid_scales=csc)
    args8 = (q, f8, fs, c8, cs, co, *sel, scale, hier)
    keep, read, pos, total = centroid_lookup_positions(*args8, fine_offsets=fo, num_tokens=n, sink_tokens=sink,
                                                       window_tokens=window, always_keys=(keys, sink, window),
                                                       **kw)
    fixed = ref.always_logz_ref(q, keys, sink, window, scale)
    rkeep, rread = ref.centroid_lookup_ref(*args8, fixed_logz=fixed, **kw)
    assert torch.equal(keep, rkeep) and torch.equal(read, rread)
    want = (rkeep * fs.unsqueeze(0)).sum(-1) + sink + window
    assert torch.equal(total.long(), want)


def test_fp8_table_without_scales_is_rejected():
    (q, fs, cs, co, _, _), (f8, fsc, c8, csc), _, _ = _case(1, 1, 2, 64, 200, 2, 3)
    thr = torch.full((1,), 0.01, device=DEV)
    with pytest.raises(ValueError, match="fine_centroid_scales"):
        centroid_lookup(q, f8, fs, c8, cs, co, thr, None, None, None, 0.1, False)
    with pytest.raises(ValueError, match="go with float8"):
        centroid_lookup(q, f8.float(), fs, c8, cs, co, thr, None, None, None, 0.1, False, fine_centroid_scales=fsc)
