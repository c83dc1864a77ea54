"""Attention-mass recall of cluster-selection estimates on a real corpus (SmolLM2, CPU).

For one needle context: build the corpus (default config), run the question + gold answer densely while
recording every layer's post-RoPE queries, then, offline, rank each layer's fine clusters per (token, KV
head) by several estimates and keep the top clusters up to the same key budget. Recall is the share of the
exact fixed-context attention mass (mean over the group's query heads) that lands on kept keys (sinks and
window always kept). Estimates:

- ``centroid``:  exp(s * q.c), the size-weighted softmax estimate the library uses (DESIGN section 1)
- ``iso_var``:   exp(s * q.c + a * s^2 |q|^2 v_c / D), v_c = mean |k - c|^2 of the cluster (one float per cluster)
- ``diag_var``:  exp(s * q.c + a * s^2 sum_d q_d^2 var_cd) (D floats per cluster: upper reference)
- ``max_bound``: exp(s * (q.c + |q| r_c)), r_c = max |k - c| (Quest-like bound, one float per cluster)
- ``cluster_oracle``: the exact mean attention probability per key of each cluster (best any estimate can do)
- ``key_oracle``: top keys by exact probability (no clusters)

Run: python benchmarks/selection_recall.py [--context 1] [--keeps 0.1,0.2,0.3]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from sqattn_index.config import SqueezeConfig
from sqattn_index.engine import SqueezedEngine
from sqattn_index.eval.tasks import group_by_context, load_tasks
from sqattn_index.hf_attention import SqueezedCache
from sqattn_index.model_loading import load_local_model
from sqattn_index.selection import cluster_token_target


def record_queries(engine, corpus, question, reply):
    store: dict[int, torch.Tensor] = {}
    orig = SqueezedCache.attend

    def attend(self, layer_idx, query, key, value, scale):
        prev = store.get(layer_idx)
        store[layer_idx] = query[0].detach().float() if prev is None else torch.cat([prev, query[0].float()], 1)
        return orig(self, layer_idx, query, key, value, scale)

    SqueezedCache.attend = attend
    try:
        engine.score(corpus, question, reply, keep=1.0)
    finally:
        SqueezedCache.attend = orig
    return store  # layer -> [Hq, T, D]


def cluster_stats(layer):
    """Per fine cluster: centroid [Hk, C, D], sizes, iso variance [Hk, C], diag variance [Hk, C, D], radius."""
    keys = layer.keys.float()
    hk, n, d = keys.shape
    offs = layer.fine_offsets
    c = layer.fine_sizes.shape[1]
    s0 = int(offs[0, 0])
    e0 = int(offs[0, -1])
    lab = torch.zeros(hk, e0 - s0, dtype=torch.long)
    for h in range(hk):
        lab[h] = torch.repeat_interleave(torch.arange(c), layer.fine_sizes[h])
    mid = keys[:, s0:e0]
    cent = layer.fine_centroids.float()
    diff = mid - torch.gather(cent, 1, lab.unsqueeze(-1).expand(-1, -1, d))
    sz = layer.fine_sizes.float()
    dvar = torch.zeros(hk, c, d).scatter_add_(1, lab.unsqueeze(-1).expand(-1, -1, d), diff ** 2) / sz.unsqueeze(-1)
    rad = torch.zeros(hk, c).scatter_reduce_(1, lab, diff.norm(dim=-1), reduce="amax")
    return cent, sz, dvar.sum(-1), dvar, rad, lab, s0, e0


def recall_for_layer(layer, q, scale, keeps, alpha):
    hk = layer.num_kv_heads
    hq, t, d = q.shape
    g = hq // hk
    cent, sz, ivar, dvar, rad, lab, s0, e0 = cluster_stats(layer)
    keys = layer.keys.float()
    out = {k: {} for k in keeps}
    for h in range(hk):
        qh = q[h * g:(h + 1) * g]  # [G, T, D]
        logits = torch.einsum("gtd,nd->gtn", qh, keys[h]) * scale
        probs = torch.softmax(logits, dim=-1)  # [G, T, N]
        mass = probs.mean(0)  # [T, N]
        vals = layer.values[h].float()
        dense_out = probs @ vals  # [G, T, D]
        onorm = dense_out.norm(dim=-1).clamp_min(1e-9)

        def out_err(keep_keys):  # keep_keys [T, N] bool -> mean relative output error
            p = probs * keep_keys.unsqueeze(0)
            o = (p / p.sum(-1, keepdim=True).clamp_min(1e-30)) @ vals
            return float(((o - dense_out).norm(dim=-1) / onorm).mean())
        always = mass[:, :s0].sum(-1) + mass[:, e0:].sum(-1)  # [T]
        mid = mass[:, s0:e0]
        cmass = torch.zeros(t, sz.shape[1]).index_add_(1, lab[h], mid)  # [T, C]
        qc = torch.einsum("gtd,cd->gtc", qh, cent[h]) * scale
        qn2 = (qh ** 2).sum(-1, keepdim=True)
        ests = {
            "centroid": qc,
            "iso_var": qc + alpha * scale ** 2 * qn2 * ivar[h] / d,
            "diag_var": qc + alpha * scale ** 2 * torch.einsum("gtd,cd->gtc", qh ** 2, dvar[h]),
            "max_bound": qc + scale * qn2.sqrt() * rad[h],
        }
        logsz = sz[h].log()
        dens = {name: torch.exp(e - torch.logsumexp(e + logsz, -1, keepdim=True)).mean(0) for name, e in ests.items()}
        dens["cluster_oracle"] = cmass / sz[h]
        for keep in keeps:
            target = cluster_token_target(layer, keep)
            for name, dn in dens.items():
                order = torch.argsort(dn, dim=-1, descending=True, stable=True)
                szo = sz[h][order]
                before = szo.cumsum(-1) - szo
                take = before < target
                kept = (cmass.gather(-1, order) * take).sum(-1)
                out[keep].setdefault(name, []).append(float((always + kept).mean()))
                cl_keep = torch.zeros_like(take).scatter_(-1, order, take)  # [T, C]
                kk = torch.ones(t, mass.shape[1], dtype=torch.bool)
                kk[:, s0:e0] = cl_keep[:, lab[h]]
                out[keep].setdefault("err_" + name, []).append(out_err(kk))
            k = int(round(target))
            tv, ti = torch.topk(mid, k, dim=-1) if k else (torch.zeros(t, 0), torch.zeros(t, 0, dtype=torch.long))
            out[keep].setdefault("key_oracle", []).append(float((always + tv.sum(-1)).mean()))
            kk = torch.ones(t, mass.shape[1], dtype=torch.bool)
            kk[:, s0:e0] = torch.zeros(t, e0 - s0, dtype=torch.bool).scatter_(-1, ti, True)
            out[keep].setdefault("err_key_oracle", []).append(out_err(kk))
    return {keep: {name: sum(v) / len(v) for name, v in r.items()} for keep, r in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="tests/data/needle_tasks.jsonl")
    ap.add_argument("--context", type=int, default=1)
    ap.add_argument("--items", type=int, default=2)
    ap.add_argument("--keeps", default="0.1,0.2,0.3")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--keys-per-fine", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    keeps = [float(k) for k in args.keeps.split(",")]
    torch.manual_seed(0)
    engine = SqueezedEngine(load_local_model(None), SqueezeConfig(keys_per_fine=args.keys_per_fine))
    context, items = group_by_context(load_tasks(args.tasks))[args.context]
    corpus, _ = engine.build_corpus([context])
    scale = 1.0 / math.sqrt(corpus.layers[0].head_dim)
    per_layer: dict[int, dict] = {}
    for task in items[:args.items]:
        qs = record_queries(engine, corpus, task.input, task.answers[0])
        for li, layer in enumerate(corpus.layers):
            r = recall_for_layer(layer, qs[li], scale, keeps, args.alpha)
            acc = per_layer.setdefault(li, {k: {} for k in keeps})
            for k in keeps:
                for name, v in r[k].items():
                    acc[k].setdefault(name, []).append(v)
    summary = {}
    for k in keeps:
        names = list(per_layer[0][k])
        summary[k] = {n: sum(sum(per_layer[li][k][n]) / len(per_layer[li][k][n]) for li in per_layer) / len(per_layer)
                      for n in names}
        print(f"keep {k} recall: "
              + "  ".join(f"{n} {v:.3f}" for n, v in summary[k].items() if not n.startswith("err_")))
        print(f"keep {k} out err: "
              + "  ".join(f"{n[4:]} {v:.3f}" for n, v in summary[k].items() if n.startswith("err_")))
    worst = sorted(per_layer, key=lambda li: -sum(per_layer[li][keeps[0]]["err_centroid"]))[:8]
    for li in worst:
        r = {n: sum(v) / len(v) for n, v in per_layer[li][keeps[0]].items()}
        print(f"  layer {li:2d} keep {keeps[0]}: " + "  ".join(f"{n} {v:.3f}" for n, v in r.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "tokens": corpus.num_tokens}, f, indent=1)


if __name__ == "__main__":
    main()
