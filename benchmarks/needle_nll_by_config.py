"""Gold NLL vs dense of one needle context for a SqueezeConfig given as key=value arguments (library path).

Run: python benchmarks/needle_nll_by_config.py CONTEXT KEEPS [field=value ...]
  e.g. python benchmarks/needle_nll_by_config.py 1 0.3,0.2,0.1 selection=budget coarse_slack=10
"""
import sys, torch
from sqattn_index.config import SqueezeConfig
from sqattn_index.engine import SqueezedEngine
from sqattn_index.eval.tasks import group_by_context, load_tasks
from sqattn_index.model_loading import load_local_model
ctx = int(sys.argv[1]); keeps=[float(x) for x in sys.argv[2].split(',')]
kw = dict(a.split('=') for a in sys.argv[3:])
kw = {k: (v == 'True') if v in ('True','False') else (int(v) if v.isdigit() else v) for k, v in kw.items()}
engine = SqueezedEngine(load_local_model(None), SqueezeConfig(**kw))
context, items = group_by_context(load_tasks("tests/data/needle_tasks.jsonl"))[ctx]
corpus, _ = engine.build_corpus([context])
def run(keep):
    sc = [engine.score(corpus, t.input, t.answers[0], keep=keep) for t in items]
    return sum(s.nll_per_token for s in sc)/len(sc), sum(s.kv_budget for s in sc)/len(sc)
d,_ = run(1.0); print(kw, "dense", round(d,4), flush=True)
for keep in keeps:
    n,b = run(keep); print(kw, keep, round(n,4), f"{100*(n/d-1):+.1f}%", "budget", round(b,3), flush=True)
