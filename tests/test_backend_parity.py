"""Backend choice: greedy generation through the Triton kernels gives the same tokens as through the torch
reference path, on the same inputs (a random-weight Llama with grouped-query heads over a squeezed fixed
context), with the logits of every step within the dtype's tolerance.

On CPU the Triton kernels run under ``TRITON_INTERPRET=1`` (float32, a tiny model); on a GPU the same check
runs in float32 and bfloat16 at head_dim 64 and 128, in both selection modes. In float32 (the kernels multiply
in full float32, as torch does unless TF32 is allowed) the tokens must be identical and the logits agree to
1e-3 of their scale. In bfloat16 two paths that round differently may split a near-tie the other way: tokens
must then agree up to a step whose reference top-2 margin is within twice the measured logit difference, and
nowhere else; the logits agree to 3e-2 of their scale.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # must happen before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from test_bench_e2e import tiny_local  # noqa: E402  (tests/ is on the path: pyproject's pythonpath)

from sqattn_index import bench_e2e as be  # noqa: E402
from sqattn_index.hf_attention import SqueezedCache  # noqa: E402
from sqattn_index.kernels.dispatch import get_ops  # noqa: E402
from sqattn_index.model_loading import LocalModel  # noqa: E402

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def generations(local: LocalModel, n: int, keep: float, steps: int):
    """backend -> (greedy tokens, per-step logits, KV budget) over one squeezed fixed context of n tokens."""
    _, corpus, _ = be.build_corpus(local, n, chunk=min(n, 2048))
    question = torch.randint(0, 32000, (9,), generator=torch.Generator().manual_seed(3))
    local.model.set_attn_implementation("sqattn")
    runs = {}
    for backend in ("torch", "triton"):
        cache = SqueezedCache(corpus, be._spec(keep), get_ops(backend))
        logits: list = []
        toks, _, _, _ = be.generate(local, cache, n, question, steps, True, step_logits=logits)
        runs[backend] = (toks, logits, cache.kv_budget)
    return runs


def check_parity(runs, tol: float, exact_tokens: bool) -> int:
    """Asserts the Triton run follows the reference; returns how many tokens agree before any near-tie split."""
    ref_toks, ref_logits, ref_budget = runs["torch"]
    toks, logits, budget = runs["triton"]
    assert len(toks) == len(ref_toks) == len(logits)
    assert abs(budget - ref_budget) <= 0.02, (budget, ref_budget)  # the same selection, up to near-tie clusters
    scale = max(float(ref_logits[0].abs().max()), 1.0)
    for i, (a, b) in enumerate(zip(ref_logits, logits)):
        diff = float((a - b).abs().max())
        assert diff <= tol * scale, f"step {i}: max |dlogit| {diff:.3g} over the tolerance {tol * scale:.3g}"
        if toks[i] != ref_toks[i]:
            top2 = a.topk(2).values
            margin = float(top2[0] - top2[1])
            assert not exact_tokens and margin <= 2 * diff, (
                f"step {i}: token {toks[i]} against {ref_toks[i]} with a reference top-2 margin {margin:.3g} "
                f"and a logit difference {diff:.3g}")
            return i  # the inputs of later steps differ
    return len(toks)


@pytest.mark.parametrize("mode", ["budget", "threshold"])
def test_triton_path_generates_the_reference_tokens_cpu(monkeypatch, mode):
    """Interpreter (or GPU) run of the tiny model in float32: identical tokens, logits within 1e-3."""
    monkeypatch.setattr(be, "SELECTION", mode)
    dev = torch.device("cuda" if CUDA else "cpu")
    runs = generations(tiny_local(dev, torch.float32, head_dim=16), n=384, keep=0.3, steps=4)
    assert check_parity(runs, tol=1e-3, exact_tokens=True) == 5


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["budget", "threshold"])
@pytest.mark.parametrize("head_dim,dtype,tol", [
    pytest.param(64, torch.float32, 1e-3, id="D64-fp32"),
    pytest.param(128, torch.float32, 1e-3, id="D128-fp32"),
    pytest.param(64, torch.bfloat16, 3e-2, id="D64-bf16"),
    pytest.param(128, torch.bfloat16, 3e-2, id="D128-bf16"),
])
def test_gpu_triton_path_generates_the_reference_tokens(monkeypatch, mode, head_dim, dtype, tol):
    monkeypatch.setattr(be, "SELECTION", mode)
    runs = generations(tiny_local(torch.device("cuda"), dtype, head_dim=head_dim, heads=8, kv_heads=2),
                       n=8192, keep=0.2, steps=8)
    agreed = check_parity(runs, tol=tol, exact_tokens=dtype == torch.float32)
    ref_logits, logits = runs["torch"][1], runs["triton"][1]
    diff = max(float((a - b).abs().max()) for a, b in zip(ref_logits[:agreed + 1], logits[:agreed + 1]))
    print(f"\n{mode} D{head_dim} {dtype}: {agreed} of {len(runs['torch'][0])} greedy tokens agree; max |dlogit| "
          f"{diff:.2e} (max |logit| {float(ref_logits[0].abs().max()):.2f}); KV budget {runs['torch'][2]:.3f} / "
          f"{runs['triton'][2]:.3f}")
