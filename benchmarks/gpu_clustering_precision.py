"""GPU timing and quality of one 128K layer's clustering (8 KV heads, head_dim 128, bf16 keys of the
synthetic clustered layer of ``sqattn_index.bench``, shuffled so the order carries no structure) with the
nearest-centroid search in float32 and in float16 (``clustering.CUDA_SIMILARITY_DTYPE``).

Quality: the mean cosine similarity of each clustered key to its fine centroid (the spherical k-means
objective), and the fraction of keys whose fine cluster, mapped to the synthetic generator's cluster by
majority, matches it (how well the known structure is recovered).

    python benchmarks/gpu_clustering_precision.py
"""

from __future__ import annotations

import time

import torch


def main() -> None:
    from sqattn_index import clustering
    from sqattn_index.bench import BenchConfig, synthetic_layer

    dev = torch.device("cuda")
    cfg = BenchConfig()
    n = 131072
    layer = synthetic_layer(8, n, 128, torch.bfloat16, dev, cfg, seed=1)
    sink, window = cfg.sink, cfg.window
    truth = torch.arange(n, device=dev)  # generator cluster of each clustered key (16 keys per cluster)
    truth = (truth - sink).clamp(min=0) // cfg.keys_per_fine
    perm = torch.randperm(n, device=dev)
    perm = torch.cat([torch.arange(sink, device=dev), perm[(perm >= sink) & (perm < n - window)],
                      torch.arange(n - window, n, device=dev)])
    keys, values = layer.keys[:, perm].contiguous(), layer.values[:, perm].contiguous()
    del layer
    print(f"device {torch.cuda.get_device_name(dev)}; one layer: 8 KV heads x {n} tokens, head_dim 128", flush=True)
    for dtype in (None, torch.float16, None, torch.float16):
        clustering.CUDA_SIMILARITY_DTYPE = dtype
        clustering.build_layer_clusters(keys[:, :4096], values[:, :4096], sink, window)  # warm up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        lay = clustering.build_layer_clusters(keys, values, sink, window, cfg.keys_per_fine, cfg.fine_per_coarse)
        torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        lo, hi = sink, n - window
        k = lay.keys[:, lo:hi].float()
        cid = torch.stack([torch.repeat_interleave(torch.arange(lay.fine_sizes.shape[1], device=dev),
                                                   lay.fine_sizes[h]) for h in range(8)])
        cent = torch.gather(lay.fine_centroids.float(), 1, cid.unsqueeze(-1).expand(-1, -1, 128))
        cos = torch.nn.functional.cosine_similarity(k, cent, dim=-1).mean().item()
        gen = truth[perm][None, :].expand(8, -1).gather(1, lay.perm)[:, lo:hi]  # generator cluster, new order
        agree = 0
        for h in range(8):  # majority generator cluster per fine cluster
            pair = cid[h] * (n // cfg.keys_per_fine + 1) + gen[h]
            uniq, cnt = torch.unique(pair, return_counts=True)
            best = torch.zeros(int(cid[h].max()) + 1, dtype=cnt.dtype, device=dev).scatter_reduce_(
                0, uniq // (n // cfg.keys_per_fine + 1), cnt, "amax")
            agree += int(best.sum())
        print(f"similarity {str(dtype or torch.float32):14}: {sec:.3f} s per layer (x32 layers: {32 * sec:.1f} s); "
              f"mean cos(key, fine centroid) {cos:.4f}; keys in their fine cluster's majority generator cluster "
              f"{agree / (8 * (hi - lo)):.4f}", flush=True)


if __name__ == "__main__":
    main()
