"""The end-to-end benchmark's generation plumbing (``sqattn_index.bench_e2e``) on a tiny random-weight Llama on
CPU: the GPU benchmark itself needs CUDA, but its helpers must not keep autograd state (a run that did went out
of GPU memory) and its keep-1.0 reference path must reproduce dense Hugging Face generation.
"""

import os

import torch

if not torch.cuda.is_available():  # must happen before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sqattn_index import bench_e2e as be  # noqa: E402
from sqattn_index.hf_attention import install_attention  # noqa: E402
from sqattn_index.kernels.dispatch import get_ops  # noqa: E402
from sqattn_index.model_loading import LocalModel  # noqa: E402


def tiny_local(device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32, head_dim: int = 16,
               heads: int = 4, kv_heads: int = 2, layers: int = 2) -> LocalModel:
    """A random-weight Llama with grouped-query heads (seed 0), the squeezed attention installed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=heads * head_dim, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=2 * heads * head_dim,
                      vocab_size=32000, max_position_embeddings=16384)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    install_attention(model)
    return LocalModel(model=model, tokenizer=None, model_id="tiny-random", device=device, dtype=dtype)


def test_generate_keeps_no_autograd_state_and_keep_all_matches_dense():
    local = tiny_local()
    n = 384
    captured, corpus, build = be.build_corpus(local, n, chunk=128)
    assert set(build) == {"prefill", "clustering", "calibration"} and min(build.values()) >= 0
    question = torch.randint(0, 32000, (8,), generator=torch.Generator().manual_seed(3))
    local.model.set_attn_implementation("sdpa")
    toks, first, ttft, times = be.generate(local, be.dense_cache(captured), n, question, 3, False)
    assert len(toks) == 4 and len(times) == 3 and ttft > 0
    assert not first.requires_grad  # generate runs under inference mode: decoding keeps no autograd graph
    local.model.set_attn_implementation("sqattn")
    (ref_toks, ref_first), cache = be._first_and_tokens(local, corpus, n, question, get_ops("torch"), 1.0, steps=3)
    assert cache.kv_budget == 1.0  # keep 1.0: every fixed key read
    # nothing dropped: the squeezed cache's reference path is dense attention over the same fixed KV
    # (in clustered order, so equal up to float summation order)
    assert float((ref_first - first).abs().max()) < 1e-4 * max(float(first.abs().max()), 1.0)
    assert ref_toks == toks
    logged = []
    row = be._check_row("check_keep_all", "keep 1.0 vs dense", (ref_toks, ref_first), (toks, first), "tiny", n, 1.0,
                        "cpu", logged.append)
    assert row["phase"] == "check_keep_all" and row["same_tokens"] and row["keep"] == 1.0
    assert row["max_logit_diff"] == float((ref_first - first).abs().max()) and "same 4 greedy tokens: True" in logged[0]
