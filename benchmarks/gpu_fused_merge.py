"""GPU A/B of the decode merge inside the sparse launch (``sparse_attention.FUSED_MERGE``: the last program of
each head merges the split-K partials, and in the epilogue form also attends the new tokens) against the
separate merge launch, in one run, at 128K keep 0.1 with a flat lookup, on the synthetic clustered layer of
``sqattn_index.bench`` (CUDA-graph timing, L2 flushed, ``bench.Timer``).

Per shape and selection mode it times, both ways: the whole decode step (lookup + sparse attention + merge),
the sparse attention alone over the step's kept positions (+ merge), and the engine's epilogue form
(``sparse_attention_with_new_tokens`` with ``--new`` new tokens in a static buffer), and checks that both ways
give the same output.

    python benchmarks/gpu_fused_merge.py [--shapes llama3-8b,llama2-7b] [--context 131072] [--new 64]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench import Timer
    from sqattn_index.kernels import sparse_attention as sa
    from sqattn_index.kernels.fused_attention import sparse_attention_with_new_tokens

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--new", type=int, default=64, help="new tokens (question + answer so far) in the epilogue form")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"device {torch.cuda.get_device_name(dev)}; context {a.context}, one new token, keep {a.keep}, flat lookup")
    for shape in a.shapes.split(","):
        layer, q, fns = build(shape, a.context, a.keep, 1, dev, hierarchical=False)
        hk, d = layer.keys.shape[0], layer.keys.shape[2]
        scale = d ** -0.5
        gen = torch.Generator(device=dev).manual_seed(0)
        nk = torch.randn(1, hk, a.new + 16, d, generator=gen, device=dev).to(q.dtype)
        nv = torch.randn(1, hk, a.new + 16, d, generator=gen, device=dev).to(q.dtype)
        slots = torch.tensor([a.new - 1], device=dev)
        out_buf = torch.empty(1, 1, q.shape[1], d, dtype=q.dtype, device=dev).transpose(1, 2)
        ticket = torch.zeros(hk, dtype=torch.int32, device=dev)
        for mode, (step, lookup) in fns.items():
            _, _, pos, total = lookup()
            kv_mb = int(total.sum()) * 2 * d * layer.keys.element_size() / 1e6
            forms = {
                "step": step,
                "sparse": lambda: sa.sparse_attention_positions(q, layer.keys, layer.values, pos, total, scale,
                                                                ticket=ticket),
                "epilogue": lambda: sparse_attention_with_new_tokens(q, layer.keys, layer.values, pos, total, nk, nv,
                                                                     slots, scale, out=out_buf, ticket=ticket),
            }
            for name, fn in forms.items():
                res = {}
                for fused in (False, True, False, True):  # interleaved: machine drift hits both
                    sa.FUSED_MERGE = fused
                    out = fn()[0].float().clone()
                    res.setdefault(fused, []).append((timer(fn), out))
                sa.FUSED_MERGE = True
                err = float((res[True][0][1] - res[False][0][1]).norm() / res[False][0][1].norm())
                sep = min(r[0] for r in res[False])
                fus = min(r[0] for r in res[True])
                extra = f", {kv_mb / fus / 1e3:.0f} GB/s of K/V fused" if name == "sparse" else ""
                log(f"{shape} {mode} {name}: separate merge {sep * 1e3:.1f} us, in-launch merge {fus * 1e3:.1f} us "
                    f"({sep / fus:.3f}x){extra}; outputs differ by rel RMS {err:.1e}")
            if int(ticket.abs().sum()) != 0:
                raise RuntimeError("the ticket buffer was not left zeroed")
        del layer, q, fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
