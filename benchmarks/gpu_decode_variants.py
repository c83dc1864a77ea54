"""GPU timing of one squeezed decode step (one new token, or --tokens question tokens; 128K fixed context, keep 10%)
in every selection variant, in one run: budget / threshold x hierarchical / flat lookup, on the synthetic clustered
layer of ``sqattn_index.bench`` (``gpu_prefill_lookup_sweep.build``; CUDA-graph timing, L2 flushed,
``bench.Timer``).

Per shape and variant it prints the lookup time, the whole step (lookup + sparse attention), the kept keys
as a fraction of the context, and with --profile the per-kernel profile of the step.

    python benchmarks/gpu_decode_variants.py [--shapes llama3-8b,llama2-7b] [--context 131072] [--tokens 1] [--profile]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench import Timer, profile_step

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tokens", type=int, default=1, help="question tokens (512: the prefill step)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"device {torch.cuda.get_device_name(dev)}; context {a.context}, {a.tokens} new token(s), keep {a.keep}")
    for shape in a.shapes.split(","):
        for hierarchical in (True, False):
            layer, q, fns = build(shape, a.context, a.keep, a.tokens, dev, hierarchical=hierarchical)
            for mode, (step, lookup) in fns.items():
                total = lookup()[3]
                kept = float(total.sum()) / (total.numel() * a.context)
                lk, st = timer(lookup), timer(step)
                log(f"{shape} {'hier' if hierarchical else 'flat'} {mode}: lookup {lk:.4f} ms, step {st:.4f} ms, "
                    f"kept {kept:.4f} of the context")
                if a.profile:
                    profile_step(step, log)
            del layer, q, fns
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
