"""Hierarchical clustering of one layer's keys: batched spherical k-means over all KV heads at once.

Fine level: about one centroid per ``keys_per_fine`` keys (on L2-normalised keys; each centroid is the
mean of the raw keys of its cluster). Coarse level: spherical k-means over the fine centroids, weighted by
cluster size. Keys and values are then reordered so every fine cluster, and every coarse cluster's fine
clusters, are contiguous (``corpus_kv`` documents the layout).
"""

from __future__ import annotations

import torch

from .corpus_kv import LayerKV

__all__ = ["spherical_kmeans", "build_layer_clusters", "assemble_layer", "assign_to_nearest", "cluster_spreads",
           "set_spreads"]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, seed: int, weights: torch.Tensor | None = None,
                     ) -> torch.Tensor:
    """Cluster labels [H, M] (int64) of points x [H, M, D] into k clusters per head, every cluster non-empty.

    Deterministic for a seed on one device (labels can differ between CPU and CUDA: the CUDA similarity search
    runs in ``CUDA_SIMILARITY_DTYPE``, so near-ties may break differently). Empty clusters are repaired each
    iteration by moving them onto the points that are least similar to their current centroid.
    """
    h, m, d = x.shape
    assert 1 <= k <= m, (k, m)
    xn = _normalise(x.float())
    w = torch.ones(h, m, device=x.device) if weights is None else weights.float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    init = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(h)]).to(x.device)  # [H, k]
    cent = torch.gather(xn, 1, init.unsqueeze(-1).expand(h, k, d))  # [H, k, D]
    labels = torch.zeros(h, m, dtype=torch.int64, device=x.device)
    xs = _for_search(xn)  # converted once, not every iteration (the centroid update stays in float32)
    for _ in range(iters):
        best, labels = _nearest(xs, cent)
        labels = _repair_empty(labels, best, k)
        sums = torch.zeros(h, k, d, device=x.device).scatter_add_(1, labels.unsqueeze(-1).expand(h, m, d),
                                                                  xn * w.unsqueeze(-1))
        cent = _normalise(sums)
    return labels


# Similarities of the nearest-centroid search on CUDA: float16 inputs and block (float32 accumulation in the
# tensor cores; unit vectors, so |similarity| <= 1 and float16 resolves it to about 5e-4). float32 CUDA-core
# matrix products and a float32 [H, chunk, k] block were most of a 128K layer's clustering time. None: float32.
# CPU runs always use float32.
CUDA_SIMILARITY_DTYPE: torch.dtype | None = torch.float16


def _for_search(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype of the nearest-centroid search (a no-op where it already is)."""
    return x.to(CUDA_SIMILARITY_DTYPE) if x.is_cuda and CUDA_SIMILARITY_DTYPE is not None else x


def _nearest(xn: torch.Tensor, cent: torch.Tensor, max_elems: int = 1 << 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Best similarity (float32) and index [H, M] of each point's nearest centroid, in chunks of points so the
    [H, chunk, k] similarity block stays under ``max_elems`` elements (long contexts, many heads)."""
    h, m, _ = xn.shape
    k = cent.shape[1]
    xn, cent = _for_search(xn), _for_search(cent)
    step = max(1, max_elems // max(h * k, 1))
    if step >= m:
        best, labels = torch.bmm(xn, cent.transpose(1, 2)).max(dim=-1)
        return best.float(), labels
    best = torch.empty(h, m, device=xn.device)
    labels = torch.empty(h, m, dtype=torch.int64, device=xn.device)
    for s in range(0, m, step):
        best[:, s:s + step], labels[:, s:s + step] = torch.bmm(xn[:, s:s + step], cent.transpose(1, 2)).max(dim=-1)
    return best, labels


def _repair_empty(labels: torch.Tensor, best: torch.Tensor, k: int, rounds: int = 8) -> torch.Tensor:
    """Give every empty cluster a point: the worst-fitting points of clusters with more than one point.

    Vectorised per round; a round that empties a cluster (two donors from one pair) is mended by the next.
    """
    h, m = labels.shape
    ones = torch.ones_like(labels, dtype=torch.float32)
    for _ in range(rounds):
        counts = torch.zeros(h, k, device=labels.device).scatter_add_(1, labels, ones)
        empty = counts == 0
        if not bool(empty.any()):
            return labels
        donor_ok = torch.gather(counts, 1, labels) > 1  # [H, M]
        fit = torch.where(donor_ok, best, torch.full_like(best, float("inf")))
        for hi in torch.nonzero(empty.any(dim=1)).flatten().tolist():
            targets = torch.nonzero(empty[hi]).flatten()
            worst = torch.topk(fit[hi], targets.numel(), largest=False).indices
            labels[hi, worst] = targets
    counts = torch.zeros(h, k, device=labels.device).scatter_add_(1, labels, ones)
    assert bool((counts > 0).all()), "empty clusters remain after repair"
    return labels


def _segment_mean(values: torch.Tensor, labels: torch.Tensor, k: int, weights: torch.Tensor | None = None):
    """Per-head (weighted) means of values [H, M, D] over labels [H, M] -> ([H, k, D] float32, sizes [H, k])."""
    h, m, d = values.shape
    w = torch.ones(h, m, device=values.device) if weights is None else weights.float()
    sums = torch.zeros(h, k, d, device=values.device).scatter_add_(
        1, labels.unsqueeze(-1).expand(h, m, d), values.float() * w.unsqueeze(-1))
    tot = torch.zeros(h, k, device=values.device).scatter_add_(1, labels, w)
    return sums / tot.clamp_min(1e-12).unsqueeze(-1), tot


def build_layer_clusters(keys: torch.Tensor, values: torch.Tensor, sink_tokens: int, window_tokens: int,
                         keys_per_fine: int = 16, fine_per_coarse: int = 16, iters: int = 12, seed: int = 0,
                         ) -> LayerKV:
    """Cluster one layer. keys, values [Hk, N, D] in original order -> a LayerKV in cluster order.

    The first ``sink_tokens`` and last ``window_tokens`` are not clustered (always attended); they are
    shrunk when the context is too short to leave at least one clustered token.
    """
    hk, n, d = keys.shape
    sink = min(sink_tokens, max(n - 1, 0))
    window = min(window_tokens, max(n - sink - 1, 0))
    m = n - sink - window
    mid = keys[:, sink:n - window]  # [Hk, M, D]
    num_fine = max(1, min(m, round(m / keys_per_fine)))
    fine_labels = spherical_kmeans(mid, num_fine, iters, seed)  # [Hk, M]
    fine_cent, fine_sizes = _segment_mean(mid, fine_labels, num_fine)  # raw-key means
    num_coarse = max(1, min(num_fine, round(num_fine / fine_per_coarse)))
    coarse_labels = spherical_kmeans(fine_cent, num_coarse, iters, seed + 1, weights=fine_sizes)  # [Hk, Cf]
    return assemble_layer(keys, values, sink, window, fine_labels, coarse_labels, num_coarse)


def assemble_layer(keys: torch.Tensor, values: torch.Tensor, sink: int, window: int, fine_labels: torch.Tensor,
                   coarse_labels: torch.Tensor, num_coarse: int) -> LayerKV:
    """Lay a clustered layer out in cluster order.

    keys, values [Hk, N, D] original order; fine_labels [Hk, M] fine cluster of each clustered token
    (M = N - sink - window, every fine cluster non-empty); coarse_labels [Hk, Cf] coarse parent of each fine
    cluster (every coarse cluster non-empty). Centroids are recomputed as means of the raw keys.
    """
    hk, n, d = keys.shape
    dev = keys.device
    m = n - sink - window
    num_fine = coarse_labels.shape[1]
    mid = keys[:, sink:n - window]
    fine_cent, fine_sizes = _segment_mean(mid, fine_labels, num_fine)
    coarse_cent, coarse_sizes = _segment_mean(fine_cent, coarse_labels, num_coarse, weights=fine_sizes)
    # Order fine clusters by coarse parent; tokens by (new) fine cluster; both stable.
    fine_order = torch.argsort(coarse_labels * num_fine + torch.arange(num_fine, device=dev), dim=1)  # [Hk, Cf]
    rank = torch.empty_like(fine_order).scatter_(1, fine_order, torch.arange(num_fine, device=dev).expand(hk, -1))
    token_fine = torch.gather(rank, 1, fine_labels)  # [Hk, M] new fine index per token
    token_order = torch.argsort(token_fine * m + torch.arange(m, device=dev), dim=1)  # [Hk, M]
    perm = torch.cat([torch.arange(sink, device=dev).expand(hk, -1), token_order + sink,
                      torch.arange(n - window, n, device=dev).expand(hk, -1)], dim=1)  # [Hk, N]
    fine_cent = torch.gather(fine_cent, 1, fine_order.unsqueeze(-1).expand(hk, num_fine, d))
    fine_sizes = torch.gather(fine_sizes, 1, fine_order).round().long()
    coarse_of_fine = torch.gather(coarse_labels, 1, fine_order)  # sorted ascending per head
    coarse_counts = torch.stack([torch.bincount(coarse_of_fine[i], minlength=num_coarse) for i in range(hk)])
    zero = torch.zeros(hk, 1, dtype=torch.int64, device=dev)
    fine_offsets = torch.cat([zero, fine_sizes.cumsum(1)], dim=1) + sink
    coarse_offsets = torch.cat([zero, coarse_counts.cumsum(1)], dim=1)
    layer = LayerKV(
        keys=torch.gather(keys, 1, perm.unsqueeze(-1).expand(hk, n, d)).contiguous(),
        values=torch.gather(values, 1, perm.unsqueeze(-1).expand(hk, n, d)).contiguous(),
        perm=perm.contiguous(),
        fine_centroids=fine_cent.to(keys.dtype).contiguous(),
        fine_sizes=fine_sizes.contiguous(),
        fine_offsets=fine_offsets.contiguous(),
        coarse_centroids=coarse_cent.to(keys.dtype).contiguous(),
        coarse_sizes=coarse_sizes.round().long().contiguous(),
        coarse_offsets=coarse_offsets.contiguous(),
        sink_tokens=sink,
        window_tokens=window,
    )
    set_spreads(layer)
    layer.check()
    return layer


def cluster_spreads(keys: torch.Tensor, fine_offsets: torch.Tensor, fine_centroids: torch.Tensor,
                    fine_sizes: torch.Tensor, coarse_centroids: torch.Tensor, coarse_offsets: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension variance of the keys around their centroid: fine [Hk, Cf] and coarse [Hk, Cc] float32.

    keys [Hk, N, D] in cluster order. fine: mean |k - c_f|^2 / D over the keys of fine cluster f. coarse: the
    same over all keys of coarse cluster C, sum_f n_f (D v_f + |c_f - c_C|^2) / (n_C D) over its fine clusters.
    The selection adds s^2 |q|^2 v / 2 to a centroid's logit: the mean of exp(s q.k) over a cluster whose keys
    spread evenly in every direction (log-normal estimate), not exp of the mean.
    """
    hk, _, d = keys.shape
    cf = fine_sizes.shape[1]
    start, end = int(fine_offsets[0, 0]), int(fine_offsets[0, -1])
    dev = keys.device
    label = torch.stack([torch.repeat_interleave(torch.arange(cf, device=dev), fine_sizes[h]) for h in range(hk)])
    fine_c = fine_centroids.float()
    sq = torch.zeros(hk, cf, device=dev)
    step = max(1, (1 << 24) // max(hk * d, 1))  # chunks of keys: bounded temporary memory
    for s in range(0, end - start, step):
        lab = label[:, s:s + step]
        diff = keys[:, start + s:start + s + lab.shape[1]].float() - torch.gather(
            fine_c, 1, lab.unsqueeze(-1).expand(-1, -1, d))
        sq.scatter_add_(1, lab, (diff * diff).sum(-1))
    n_f = fine_sizes.float()
    fine = sq / (n_f * d)
    parent = torch.searchsorted(coarse_offsets[:, 1:].contiguous(),
                                torch.arange(cf, device=dev).expand(hk, cf).contiguous(), right=True)
    between = ((fine_c - torch.gather(coarse_centroids.float(), 1,
                                      parent.unsqueeze(-1).expand(-1, -1, d))) ** 2).sum(-1)
    cc = coarse_centroids.shape[1]
    num = torch.zeros(hk, cc, device=dev).scatter_add_(1, parent, n_f * (fine * d + between))
    n_c = torch.zeros(hk, cc, device=dev).scatter_add_(1, parent, n_f)
    return fine.contiguous(), (num / (n_c.clamp_min(1.0) * d)).contiguous()


def set_spreads(layer: LayerKV) -> None:
    """Fill ``layer.fine_spread`` and ``layer.coarse_spread`` from its keys and clusters."""
    layer.fine_spread, layer.coarse_spread = cluster_spreads(
        layer.keys, layer.fine_offsets, layer.fine_centroids, layer.fine_sizes, layer.coarse_centroids,
        layer.coarse_offsets)


def assign_to_nearest(keys: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Fine label [H, M] of each key [H, M, D]: the centroid [H, C, D] of highest cosine similarity."""
    return _nearest(_normalise(keys.float()), _normalise(centroids.float()))[1]
