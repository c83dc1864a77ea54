"""How often the Triton lookup and the torch reference take a different keep decision, and how close to the
threshold those decisions sit. CPU (Triton interpreter) or GPU.

Setting: the flat threshold lookup of one decode token (``centroid_lookup_positions`` path, decisions from the
stored logits) on the synthetic clustered layer of ``sqattn_index.bench``. Thresholds are calibrated, as the
engine does, on *other* queries (a separate calibration batch), then applied to fresh decode queries. For
every decision that differs between the two paths it prints the relative gap |p - thr| / thr of the
reference probability, so one can see whether the flips are float-rounding ties or real disagreements.

    python benchmarks/decision_ties.py [--context 8192] [--shape llama2-7b] [--queries 64]
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():  # before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")


def main() -> None:
    from sqattn_index.bench import SHAPES, BenchConfig, calibrate, estimate_kwargs, make_queries, synthetic_layer
    from sqattn_index.kernels.lookup import centroid_lookup, centroid_probs
    from sqattn_index.kernels.reference import always_logz_ref, centroid_lookup_ref

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--queries", type=int, default=64, help="decode queries (one per batch row)")
    ap.add_argument("--keep", type=float, default=0.1)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = BenchConfig()
    hq, hk, d = SHAPES[a.shape]
    scale = d ** -0.5
    layer = synthetic_layer(hk, a.context, d, dtype, dev, cfg, seed=5)
    calib = make_queries(layer, hq, 16, seed=11).reshape(1, hk, (hq // hk) * 16, d)
    fthr, _ = calibrate(layer, calib, a.keep, cfg, scale, False)
    q = torch.cat([make_queries(layer, hq, 1, seed=100 + i).reshape(1, hk, hq // hk, d) for i in range(a.queries)])
    base = (q, layer.fine_centroids, layer.fine_sizes, layer.coarse_centroids, layer.coarse_sizes,
            layer.coarse_offsets, fthr, None, None, None, scale, False)
    kw = estimate_kwargs(layer, q, scale, "full")
    keys, sink, window = kw.pop("always_keys")
    fixed = always_logz_ref(q, keys, sink, window, scale)
    keep, _ = centroid_lookup(*base, fixed_logz=fixed, **kw)
    rkeep, _ = centroid_lookup_ref(*base, fixed_logz=fixed, **kw)
    rprobs, _ = centroid_probs(*base, fixed_logz=fixed, **kw)  # Triton probabilities, for the gaps
    diff = keep != rkeep
    n = keep.numel()
    print(f"{a.shape} N={a.context} on {dev.type}: {a.queries} decode queries x {hk} KV heads x "
          f"{keep.shape[-1]} clusters = {n} decisions; kept {float(rkeep.float().mean()):.3f} of clusters; "
          f"different decisions: {int(diff.sum())}")
    thr = fthr.view(1, hk, 1).expand_as(rprobs)
    gaps = ((rprobs - thr).abs() / thr)[diff]
    if gaps.numel():
        print(f"  relative gap |p - thr| / thr of the differing decisions: max {float(gaps.max()):.2e}, "
              f"median {float(gaps.median()):.2e}")
    all_gaps = ((rprobs - thr).abs() / thr).flatten()
    for tol in (1e-7, 1e-6, 1e-5, 1e-4):
        print(f"  decisions within {tol:.0e} (relative) of their threshold: {int((all_gaps < tol).sum())} "
              f"({float((all_gaps < tol).float().mean()):.2e} of all)")


if __name__ == "__main__":
    main()
