"""Gold-NLL ablation of the selection estimate (SmolLM2, CPU, budget selection, flat top clusters per token).

Variants (names combine): key (oracle: top keys by exact probability), cluster (oracle: clusters ranked by
their exact mean probability per key), centroid (exp(s q.c), the plain estimate), _fz (exact sink + window
terms in the normaliser), _ivar (+ s^2 |q|^2 v_c / 2 with v_c the cluster key variance per dimension),
_dvar (per-dimension variances), _allz (new tokens in the normaliser too), _max (max over the group
query heads instead of the mean).

Run: python benchmarks/estimate_ablation.py CONTEXT KEEPS VARIANTS [ALPHA]
  e.g. python benchmarks/estimate_ablation.py 1 0.3,0.1 centroid,centroid_fz_ivar 0.5
Output of the runs quoted in docs/eval/README.md: docs/eval/estimate_ablation.txt.
"""
import sys, math, torch
from sqattn_index.config import SqueezeConfig
from sqattn_index.engine import SqueezedEngine
from sqattn_index.eval.tasks import group_by_context, load_tasks
from sqattn_index.hf_attention import SqueezedCache
from sqattn_index.model_loading import load_local_model
from sqattn_index.selection import cluster_token_target
ctx = int(sys.argv[1]); keeps=[float(x) for x in sys.argv[2].split(',')]; variants=sys.argv[3].split(',')
engine = SqueezedEngine(load_local_model(None), SqueezeConfig(selection="budget"))
context, items = group_by_context(load_tasks("tests/data/needle_tasks.jsonl"))[ctx]
corpus, _ = engine.build_corpus([context])
LAB = {}
def labels(layer):
    key = id(layer)
    if key not in LAB:
        s0 = int(layer.fine_offsets[0,0]); e0 = int(layer.fine_offsets[0,-1])
        LAB[key] = (torch.stack([torch.repeat_interleave(torch.arange(layer.fine_sizes.shape[1]), layer.fine_sizes[h])
                                 for h in range(layer.num_kv_heads)]), s0, e0)
    return LAB[key]
ALPHA = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5
STATE = {"variant": None, "keep": 1.0}
orig = SqueezedCache.attend
def attend(self, li, query, key, value, scale):
    var = STATE["variant"]
    if var is None: return orig(self, li, query, key, value, scale)
    layer = self.corpus.layers[li]
    lab, s0, e0 = labels(layer)
    hk = layer.num_kv_heads; b, hq, t, d = query.shape; g = hq // hk
    K = layer.keys.float(); V = layer.values.float()
    q = query[0].float()  # [Hq, T, D]
    outs = []
    target = cluster_token_target(layer, STATE["keep"])
    nf = layer.fine_sizes.shape[1]
    for h in range(hk):
        qh = q[h*g:(h+1)*g]
        lf = torch.einsum("gtd,nd->gtn", qh, K[h]) * scale  # fixed logits
        probs = torch.softmax(lf, -1).mean(0)  # [T, N]
        keepm = torch.ones(t, K.shape[1], dtype=torch.bool)
        mid = probs[:, s0:e0]
        if var == "key":
            k = int(round(target))
            idx = torch.topk(mid, k, -1).indices
            keepm[:, s0:e0] = torch.zeros_like(mid, dtype=torch.bool).scatter_(-1, idx, True)
        else:
            sz = layer.fine_sizes[h].float()
            if var == "cluster":
                dens = torch.zeros(t, nf).index_add_(1, lab[h], mid) / sz
            else:  # centroid
                e = torch.einsum("gtd,cd->gtc", qh, layer.fine_centroids[h].float()) * scale
                if "var" in var:
                    cent = layer.fine_centroids[h].float()
                    diff = K[h, s0:e0] - cent[lab[h]]
                    dv = torch.zeros(nf, d).index_add_(0, lab[h], diff ** 2) / sz.unsqueeze(-1)
                    if "dvar" in var:
                        e = e + ALPHA * scale ** 2 * torch.einsum("gtd,cd->gtc", qh ** 2, dv)
                    else:
                        e = e + ALPHA * scale ** 2 * (qh ** 2).sum(-1, keepdim=True) * dv.sum(-1) / d
                lz = torch.logsumexp(e + sz.log(), -1, keepdim=True)
                if "_fz" in var:
                    ex = torch.cat([lf[..., :s0], lf[..., e0:]], -1)
                    lz = torch.logaddexp(lz, torch.logsumexp(ex, -1, keepdim=True))
                if "_allz" in var:
                    kn0 = key[0, h].float(); m0 = kn0.shape[0]
                    ln0 = torch.einsum("gtd,md->gtm", qh, kn0) * scale
                    c0 = torch.arange(m0).view(1, m0) <= (torch.arange(m0 - t, m0).view(t, 1))
                    ln0 = ln0.masked_fill(~c0.unsqueeze(0), float("-inf"))
                    lz = torch.logaddexp(lz, torch.logsumexp(ln0, -1, keepdim=True))
                dens = torch.exp(e - lz)
                dens = dens.amax(0) if var.endswith("_max") else dens.mean(0)
            order = torch.argsort(dens, dim=-1, descending=True, stable=True)
            szo = sz[order]; take = (szo.cumsum(-1) - szo) < target
            cl = torch.zeros_like(take).scatter_(-1, order, take)
            keepm[:, s0:e0] = cl[:, lab[h]]
        lf = lf.masked_fill(~keepm.unsqueeze(0), float("-inf"))
        kn = key[0, h].float(); vn = value[0, h].float()  # new tokens [M, D]
        ln = torch.einsum("gtd,md->gtm", qh, kn) * scale
        m = kn.shape[0]
        causal = torch.arange(m).view(1, m) <= (torch.arange(m - t, m).view(t, 1))
        ln = ln.masked_fill(~causal.unsqueeze(0), float("-inf"))
        p = torch.softmax(torch.cat([lf, ln], -1), -1)
        outs.append(p[..., :K.shape[1]] @ V[h] + p[..., K.shape[1]:] @ vn)
    return torch.cat(outs, 0).unsqueeze(0)
SqueezedCache.attend = attend
def run(keep):
    STATE["keep"] = keep
    nll = [engine.score(corpus, t.input, t.answers[0], keep=keep).nll_per_token for t in items]
    return sum(nll)/len(nll)
STATE["variant"] = None; d = run(1.0); print("dense(lib)", round(d,4), flush=True)
STATE["variant"] = "key"; print("dense(mine)", round(run(1.0),4), flush=True)
for var in variants:
    STATE["variant"] = var
    for keep in keeps:
        n = run(keep); print(var, keep, round(n,4), f"{100*(n/d-1):+.1f}%", flush=True)
