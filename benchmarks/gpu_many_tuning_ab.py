"""GPU A/B of settings of the many-query (prefill) lookup (``kernels.lookup_many.TUNING_MANY``), rounds alternating
the variants in one run: lookup and whole-step (lookup + sparse attention) times, and how many fine-cluster
decisions differ from the first variant's.

512 question tokens, 128K fixed context, keep 10%, the synthetic clustered layer
(``gpu_prefill_lookup_sweep.build``, hierarchical lookup), threshold and budget selection, CUDA graphs, L2
flushed (``bench.Timer``). Variants: a JSON object, name -> TUNING_MANY overrides (default: the fused coarse
level of session 12 against the separate probability launch).

    python benchmarks/gpu_many_tuning_ab.py [--shapes llama3-8b,llama2-7b] [--rounds 3] [--variants JSON]
"""

from __future__ import annotations

import argparse
import json

import torch

VARIANTS = {"coarse fused": {"coarse_fused": True}, "coarse probability launch": {"coarse_fused": False}}


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench import Timer, profile_step
    from sqattn_index.kernels import lookup_many as lm

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--modes", default="threshold,budget")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", default="", help="a variant name: per-kernel profile of its lookup")
    ap.add_argument("--variants", default="", help="JSON: name -> TUNING_MANY overrides")
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"device {torch.cuda.get_device_name(dev)}; context {a.context}, {a.tokens} question tokens, keep {a.keep}")
    default = dict(lm.TUNING_MANY)
    variants = json.loads(a.variants) if a.variants else VARIANTS

    def use(over):
        lm.TUNING_MANY.clear()
        lm.TUNING_MANY.update(default, **over)

    for shape in a.shapes.split(","):
        layer, q, fns = build(shape, a.context, a.keep, a.tokens, dev)
        for mode in a.modes.split(","):
            step, lookup = fns[mode]
            use(next(iter(variants.values())))
            keep0 = lookup()[0].clone()
            for name, over in variants.items():
                use(over)
                diff = int((lookup()[0] != keep0).sum())
                log(f"{shape} {mode} {name}: fine decisions differing from the first variant's {diff} of "
                    f"{keep0.numel()}")
                if name == a.profile:
                    profile_step(lookup, log)
            for r in range(a.rounds):
                res = []
                for name, over in variants.items():
                    use(over)
                    res.append(f"{name} {timer(lookup) * 1000:.1f}/{timer(step) * 1000:.1f}")
                log(f"{shape} {mode} round {r} (lookup/step us): " + ", ".join(res))
        use({})
        del layer, q, fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
