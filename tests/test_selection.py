"""Clustering layout, selection and calibration on random data (torch reference path)."""

from __future__ import annotations

import pytest
import torch

from sqattn_index.calibration import calibrate_layer, measured_keep_fraction
from sqattn_index.clustering import build_layer_clusters, spherical_kmeans
from sqattn_index.kernels.reference import (
    centroid_lookup_ref,
    group_queries_ref,
    lse_merge_ref,
    ranges_from_mask_ref,
    sparse_attention_ref,
)
from sqattn_index.selection import SelectionSpec, select_ranges

from types import SimpleNamespace

OPS = SimpleNamespace(centroid_lookup=centroid_lookup_ref, ranges_from_mask=ranges_from_mask_ref)


def clustered_keys(hk=2, n=600, d=16, centres=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(hk, centres, d, generator=g) * 3
    lab = torch.randint(0, centres, (hk, n), generator=g)
    keys = torch.gather(c, 1, lab.unsqueeze(-1).expand(hk, n, d)) + torch.randn(hk, n, d, generator=g)
    return keys, torch.randn(hk, n, d, generator=g)


@pytest.fixture(scope="module")
def layer():
    keys, values = clustered_keys()
    return build_layer_clusters(keys, values, sink_tokens=4, window_tokens=32, keys_per_fine=8, fine_per_coarse=4,
                                iters=10, seed=0), keys, values


def test_layout_is_a_permutation_with_contiguous_clusters(layer):
    lay, keys, values = layer
    lay.check()
    for h in range(lay.num_kv_heads):
        assert sorted(lay.perm[h].tolist()) == list(range(lay.num_tokens))
        assert torch.equal(lay.keys[h], keys[h, lay.perm[h]])
        assert torch.equal(lay.values[h], values[h, lay.perm[h]])
        # Sinks and window stay in place.
        assert lay.perm[h, :4].tolist() == [0, 1, 2, 3]
        assert lay.perm[h, -32:].tolist() == list(range(lay.num_tokens - 32, lay.num_tokens))
        # Each fine centroid is the mean of the raw keys of its range.
        for j in (0, lay.num_fine // 2, lay.num_fine - 1):
            s, e = lay.fine_offsets[h, j].item(), lay.fine_offsets[h, j + 1].item()
            assert torch.allclose(lay.fine_centroids[h, j], lay.keys[h, s:e].mean(0), atol=1e-5)


def test_cluster_spreads_are_the_key_variances(layer):
    lay = layer[0]
    d = lay.head_dim
    for h in range(lay.num_kv_heads):
        for j in (0, lay.num_fine // 3, lay.num_fine - 1):
            s, e = lay.fine_offsets[h, j].item(), lay.fine_offsets[h, j + 1].item()
            want = ((lay.keys[h, s:e] - lay.fine_centroids[h, j]) ** 2).sum(-1).mean() / d
            assert torch.allclose(lay.fine_spread[h, j], want, rtol=1e-4, atol=1e-6)
        for c in (0, lay.num_coarse - 1):
            f0, f1 = lay.coarse_offsets[h, c].item(), lay.coarse_offsets[h, c + 1].item()
            s, e = lay.fine_offsets[h, f0].item(), lay.fine_offsets[h, f1].item()
            want = ((lay.keys[h, s:e] - lay.coarse_centroids[h, c]) ** 2).sum(-1).mean() / d
            assert torch.allclose(lay.coarse_spread[h, c], want, rtol=1e-4, atol=1e-6)


def test_variance_term_estimates_the_mean_exponential():
    """For keys spread as a Gaussian around c, mean exp(s q.k) = exp(s q.c + s^2 |q|^2 v / 2): the spread
    term brings the estimate to the Monte Carlo mean where the bare centroid underestimates it."""
    g = torch.Generator().manual_seed(2)
    d, v, s = 32, 0.4, 32 ** -0.5
    c = torch.randn(d, generator=g)
    k = c + v ** 0.5 * torch.randn(200000, d, generator=g)
    q = 3 * torch.randn(d, generator=g)
    mc = torch.logsumexp(s * k @ q, 0) - torch.log(torch.tensor(200000.0))
    bare = s * (q @ c)
    with_term = bare + 0.5 * s * s * (q @ q) * v
    assert abs(float(with_term - mc)) < 0.05 < abs(float(bare - mc))


def test_kmeans_is_deterministic_and_repairs_empty_clusters():
    x = torch.randn(2, 50, 8)
    x[:, 10:] = x[:, :1]  # 41 identical points: many clusters would be empty without repair
    a = spherical_kmeans(x, 20, iters=5, seed=3)
    b = spherical_kmeans(x, 20, iters=5, seed=3)
    assert torch.equal(a, b)
    for h in range(2):
        assert torch.bincount(a[h], minlength=20).min() >= 1


@pytest.mark.parametrize("g,t,b", [pytest.param(1, 1, 1, id="mha-decode"), pytest.param(3, 5, 1, id="gqa-prefill"),
                                   pytest.param(2, 1, 2, id="gqa-batch2")])
def test_sparse_reference_equals_masked_dense(layer, g, t, b):
    lay = layer[0]
    hk, n, d = lay.keys.shape
    q = torch.randn(b, hk * g, t, d)
    g_ = torch.Generator().manual_seed(1)
    keep = torch.rand(b, hk, lay.num_fine, generator=g_) < 0.3
    starts, ends, counts = ranges_from_mask_ref(keep, lay.fine_offsets, n, lay.sink_tokens, lay.window_tokens)
    out, lse = sparse_attention_ref(q, lay.keys, lay.values, starts, ends, counts, d ** -0.5)
    for bi in range(b):
        for h in range(hk):
            mask = torch.zeros(n, dtype=torch.bool)
            for s, e in zip(starts[bi, h, :counts[bi, h]].tolist(), ends[bi, h, :counts[bi, h]].tolist()):
                mask[s:e] = True
            # The kept set is exactly sinks + window + the kept clusters.
            expect = torch.zeros(n, dtype=torch.bool)
            expect[: lay.sink_tokens] = True
            expect[n - lay.window_tokens:] = True
            for j in keep[bi, h].nonzero().flatten().tolist():
                expect[lay.fine_offsets[h, j]:lay.fine_offsets[h, j + 1]] = True
            assert torch.equal(mask, expect)
            qh = q[bi, h * g:(h + 1) * g]
            s = (qh @ lay.keys[h].t()) * d ** -0.5
            s = s.masked_fill(~mask, float("-inf"))
            dense = torch.softmax(s, -1) @ lay.values[h]
            assert torch.allclose(out[bi, h * g:(h + 1) * g], dense, atol=1e-5)
            assert torch.allclose(lse[bi, h * g:(h + 1) * g], torch.logsumexp(s, -1), atol=1e-5)


def test_empty_keep_set_and_merge():
    q = torch.randn(1, 2, 3, 8)
    keys = torch.randn(1, 10, 8)
    z = torch.zeros(1, 1, 1, dtype=torch.int64)
    out, lse = sparse_attention_ref(q, keys, keys, z, z, torch.zeros(1, 1, dtype=torch.int64), 0.3)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    other = torch.randn(1, 2, 3, 8)
    merged, mlse = lse_merge_ref(out, lse, other, torch.zeros(1, 2, 3))
    assert torch.allclose(merged, other) and torch.allclose(mlse, torch.zeros(1, 2, 3))


def test_hierarchical_with_permissive_coarse_equals_flat(layer):
    lay = layer[0]
    hk, d = lay.num_kv_heads, lay.head_dim
    q = group_queries_ref(torch.randn(1, hk * 3, 4, d) * 2, hk)
    thr = torch.full((hk,), 1.0 / lay.num_tokens)
    args = (q, lay.fine_centroids, lay.fine_sizes, lay.coarse_centroids, lay.coarse_sizes, lay.coarse_offsets)
    flat, read_flat = centroid_lookup_ref(*args, thr, None, None, None, d ** -0.5, hierarchical=False)
    hier, read_hier = centroid_lookup_ref(*args, thr, torch.full((hk,), -1.0), None, None, d ** -0.5)
    assert torch.equal(flat, hier) and flat.any() and not flat.all()
    assert torch.all(read_hier == lay.num_fine + lay.num_coarse) and torch.all(read_flat == lay.num_fine)
    # A strict coarse threshold reads fewer fine centroids and keeps a subset.
    strict, read_strict = centroid_lookup_ref(*args, thr, torch.full((hk,), 2.0 / lay.num_tokens), None, None,
                                              d ** -0.5)
    assert torch.all(read_strict < read_hier)


def test_stable_with_huge_logits(layer):
    lay = layer[0]
    hk, d = lay.num_kv_heads, lay.head_dim
    q = group_queries_ref(torch.randn(1, hk, 1, d) * 1e4, hk)  # would overflow exp() without max-subtraction
    keep, _ = centroid_lookup_ref(q, lay.fine_centroids, lay.fine_sizes, lay.coarse_centroids, lay.coarse_sizes,
                                  lay.coarse_offsets, torch.full((hk,), 1e-6), torch.full((hk,), 1e-6), None, None,
                                  d ** -0.5)
    assert keep.any(dim=-1).all()


def test_calibration_hits_target_fractions(layer):
    lay, keys, _ = layer
    hk, n, d = keys.shape
    ladder = (0.5, 0.3, 0.2, 0.1)
    window_q = keys[:, -32:].repeat_interleave(2, dim=0) + 0.3 * torch.randn(hk * 2, 32, d)  # [Hq, W, D]
    calibrate_layer(lay, window_q, ladder, d ** -0.5, coarse_slack=5.0)
    assert torch.isfinite(lay.thresholds).all() and torch.isfinite(lay.coarse_thresholds).all()
    s, e = lay.clustered_range
    for i, keep in enumerate(ladder):
        target = (keep * n - (n - (e - s))) / (e - s)
        got = measured_keep_fraction(lay, window_q, i, d ** -0.5)
        assert abs(got - target) <= 0.05, (keep, target, got)


def test_flat_calibration_hits_target_fractions_of_the_flat_lookup(layer):
    """hierarchical=False: fine thresholds on the flat estimate, so a flat lookup keeps the target share;
    they differ from the hierarchical calibration's (another denominator, no coarse filter)."""
    lay, keys, _ = layer
    hk, n, d = keys.shape
    ladder = (0.3, 0.1)
    window_q = keys[:, -32:].repeat_interleave(2, dim=0) + 0.3 * torch.randn(hk * 2, 32, d)
    calibrate_layer(lay, window_q, ladder, d ** -0.5, coarse_slack=2.0)
    hier_thr = lay.thresholds.clone()
    calibrate_layer(lay, window_q, ladder, d ** -0.5, coarse_slack=2.0, hierarchical=False)
    assert not torch.equal(hier_thr, lay.thresholds)
    s, e = lay.clustered_range
    for i, keep in enumerate(ladder):
        target = (keep * n - (n - (e - s))) / (e - s)
        got = measured_keep_fraction(lay, window_q, i, d ** -0.5, hierarchical=False)
        assert abs(got - target) <= 0.03, (keep, target, got)


def test_budget_selection_counts_tokens(layer):
    lay = layer[0]
    hk, n, d = lay.keys.shape
    q = torch.randn(1, hk * 2, 1, d)
    sel = select_ranges(lay, q, SelectionSpec(keep=0.3, mode="budget"), OPS, d ** -0.5)
    target = 0.3 * n * hk
    assert target <= sel.tokens_read <= target + hk * lay.fine_sizes.max().item()
    dense = select_ranges(lay, q, SelectionSpec(keep=1.0), OPS, d ** -0.5)
    assert dense.tokens_read == n * hk and dense.centroids_read == 0


def test_budget_lookup_goes_flat_when_the_coarse_budget_covers_most_keys(layer):
    """Coarse budget >= FLAT_ABOVE of the clustered keys: no coarse pass (Cf centroids scored, not Cc + the
    allowed fine ones); below it the hierarchy prunes. Either way the kept tokens meet the target."""
    from sqattn_index.selection import FLAT_ABOVE, cluster_token_target

    lay = layer[0]
    hk, n, d = lay.keys.shape
    s, e = lay.clustered_range
    q = torch.randn(1, hk * 2, 1, d, generator=torch.Generator().manual_seed(3))
    keep = 0.15
    cover = cluster_token_target(lay, keep) / (e - s)  # coarse budget / clustered keys at slack 1
    cf, cc = lay.fine_centroids.shape[1], lay.coarse_centroids.shape[1]
    flat = select_ranges(lay, q, SelectionSpec(keep=keep, mode="budget", coarse_slack=FLAT_ABOVE / cover + 0.01),
                         OPS, d ** -0.5)
    assert int(flat.centroids_read) == hk * cf
    hier = select_ranges(lay, q, SelectionSpec(keep=keep, mode="budget", coarse_slack=0.5 * FLAT_ABOVE / cover),
                         OPS, d ** -0.5)
    assert cc * hk < int(hier.centroids_read) < hk * (cc + cf)
    for sel in (flat, hier):
        assert int(sel.tokens_read) >= keep * n * hk - hk  # the fine budget is met (or capped by the coarse one)


def test_fp8_spec_scores_the_8bit_tables_in_decode_only(layer):
    """centroid_precision="fp8": decode-sized lookups (<= 16 grouped queries per KV head) select with the
    layer's 8-bit tables, exactly as the reference on the dequantised tables; larger lookups use the layer's
    own tables. The bytes counted per centroid follow."""
    from sqattn_index.config import ConfigError, SqueezeConfig
    from sqattn_index.kernels.centroid_fp8 import FP8, dequantize_centroids
    from sqattn_index.selection import centroid_bytes

    lay = layer[0]
    hk, n, d = lay.keys.shape
    tables = lay.fp8_tables()
    assert tables["fine_centroids"].dtype == FP8 and lay.fp8_tables() is tables  # made once
    fdq = dequantize_centroids(tables["fine_centroids"], tables["fine_centroid_scales"])
    cdq = dequantize_centroids(tables["coarse_centroids"], tables["coarse_centroid_scales"])
    spec8 = SelectionSpec.from_config(0.2, SqueezeConfig(selection="budget", centroid_precision="fp8"))
    spec16 = SelectionSpec(keep=0.2, mode="budget", centroid_precision="model")
    assert spec8.centroid_precision == "fp8" and spec8.fp8_for(16) and not spec8.fp8_for(17)
    g = torch.Generator().manual_seed(5)
    for t, fp8_used in ((1, True), (12, False)):  # 2 x 1 = 2 and 2 x 12 = 24 grouped queries per KV head
        q = 2 * torch.randn(1, hk * 2, t, d, generator=g)
        sel8 = select_ranges(lay, q, spec8, OPS, d ** -0.5)
        sel16 = select_ranges(lay, q, spec16, OPS, d ** -0.5)
        dq = type(lay)(**{**lay.tensors(), "fine_centroids": fdq, "coarse_centroids": cdq},
                       sink_tokens=lay.sink_tokens, window_tokens=lay.window_tokens, keep_ladder=lay.keep_ladder)
        want = select_ranges(dq, q, spec16, OPS, d ** -0.5) if fp8_used else sel16
        assert torch.equal(sel8.starts, want.starts) and torch.equal(sel8.ends, want.ends)
    assert centroid_bytes(lay, spec8, 2) == d + 4 and centroid_bytes(lay, spec8, 24) == 4 * d + 4
    with pytest.raises(ConfigError, match="centroid_precision"):
        SqueezeConfig(centroid_precision="int4")
