"""One squeezed decode step (budget-mode lookup + sparse attention) of the synthetic 128K layer of
``sqattn_index.bench``, run a few times: a target for Nsight Compute, e.g.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats -k regex:"_sparse_attn_kernel|_budget_kernel|_lse_kernel" \\
        python benchmarks/gpu_decode_step_once.py --shape llama3-8b
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--mode", default="budget", choices=("budget", "threshold"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--flat", action="store_true", help="flat lookup over every fine centroid")
    a = ap.parse_args()
    _, _, fns = build(a.shape, a.context, a.keep, a.tokens, torch.device("cuda"), hierarchical=not a.flat)
    step, _ = fns[a.mode]
    step()  # compile outside the profiled range
    torch.cuda.synchronize()
    torch.cuda.profiler.start()  # with ncu --profile-from-start off: only these steps
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("done", flush=True)


if __name__ == "__main__":
    main()
