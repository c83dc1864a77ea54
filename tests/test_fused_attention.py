"""The fused decode epilogue (fixed-context partials + causal new tokens, one kernel) and the in-kernel KV-budget
counter, against their torch references; and the cache's Triton path against its torch path.

On CPU the kernels run under the Triton interpreter at small sizes; ``gpu`` cases run real sizes on CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # must happen before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sqattn_index.kernels import reference as ref  # noqa: E402
from sqattn_index.kernels.fused_attention import sparse_attention_with_new_tokens  # noqa: E402
from sqattn_index.kernels.positions import kept_positions  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def rel_rms(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def random_positions(b, hk, n, gen, empty=()):
    """Sorted random kept positions per (b, h) with ragged totals; (b, h) in ``empty`` keeps nothing."""
    pos = torch.full((b, hk, n), -7, dtype=torch.int32)  # garbage past total
    total = torch.zeros(b, hk, dtype=torch.int32)
    for bi in range(b):
        for h in range(hk):
            if (bi, h) in empty:
                continue
            k = int(torch.randint(1, n, (1,), generator=gen))
            idx = torch.randperm(n, generator=gen)[:k].sort().values
            pos[bi, h, :k] = idx.to(torch.int32)
            total[bi, h] = k
    return pos, total


def make_case(b, hk, g, t, n, d, cap, dt, seed, empty=()):
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dt]
    q = torch.randn(b, hk * g, t, d, generator=gen).to(dtype)
    keys = torch.randn(hk, n, d, generator=gen).to(dtype)
    values = torch.randn(hk, n, d, generator=gen).to(dtype)
    nk = torch.randn(b, hk, cap, d, generator=gen).to(dtype)
    nv = torch.randn(b, hk, cap, d, generator=gen).to(dtype)
    last = int(torch.randint(t - 1, cap, (1,), generator=gen))  # query tokens sit at slots last-t+1 .. last
    slots = torch.arange(last - t + 1, last + 1)
    pos, total = random_positions(b, hk, n, gen, empty)
    return [x.to(DEV) for x in (q, keys, values, pos, total, nk, nv, slots)]


def tol(dtype):
    if not CUDA:
        return 1e-5  # the interpreter upcasts everything to fp32
    return 3e-3 if dtype == torch.float32 else 1.2e-2  # tf32 / p rounded to 16 bits in the PV product


FUSED_CASES = [
    pytest.param(1, 2, 4, 1, 300, 128, 40, "bf16", None, id="decode-B1-G4-D128-bf16"),
    pytest.param(2, 2, 1, 1, 257, 64, 9, "fp16", 3, id="decode-B2-G1-D64-fp16-split3"),
    pytest.param(2, 1, 3, 1, 200, 64, 70, "fp32", 1, id="decode-B2-G3-D64-fp32-nosplit"),
    pytest.param(2, 2, 2, 7, 230, 64, 20, "bf16", 2, id="prefill-B2-G2-T7-D64-bf16"),
    pytest.param(1, 1, 2, 12, 150, 128, 12, "fp32", None, id="prefill-B1-G2-T12-D128-fp32-full-buffer"),
]


@pytest.mark.parametrize("b,hk,g,t,n,d,cap,dt,splits", FUSED_CASES)
def test_fused_attention_matches_ref(b, hk, g, t, n, d, cap, dt, splits):
    q, keys, values, pos, total, nk, nv, slots = make_case(b, hk, g, t, n, d, cap, dt, seed=7 * n + cap,
                                                           empty={(b - 1, hk - 1)})
    scale = d ** -0.5
    out, lse = sparse_attention_with_new_tokens(q, keys, values, pos, total, nk, nv, slots, scale,
                                                num_splits=splits)
    rout, rlse = ref.sparse_attention_with_new_tokens_ref(q, keys, values, pos, total, nk, nv, slots, scale)
    assert out.dtype == torch.float32 and out.shape == rout.shape and lse.shape == rlse.shape
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()  # new tokens make every row non-empty
    assert rel_rms(out, rout) < tol(q.dtype)
    assert (lse - rlse).abs().max() < 50 * tol(q.dtype)


def test_fused_attention_writes_caller_layout_and_dtype():
    """Output straight into a [B, T, Hq, D] bf16 buffer seen as [B, Hq, T, D]; garbage past slots unread."""
    q, keys, values, pos, total, nk, nv, slots = make_case(1, 2, 3, 4, 180, 64, 16, "bf16", seed=3)
    b, hq, t, d = q.shape
    buf = torch.full((b, t, hq, d), 99.0, dtype=torch.bfloat16, device=DEV)
    out, _ = sparse_attention_with_new_tokens(q, keys, values, pos, total, nk, nv, slots, 0.125,
                                              out=buf.transpose(1, 2))
    assert out.data_ptr() == buf.data_ptr() and out.dtype == torch.bfloat16
    rout, _ = ref.sparse_attention_with_new_tokens_ref(q, keys, values, pos, total, nk, nv, slots, 0.125)
    assert rel_rms(buf.transpose(1, 2).float(), rout) < 1e-2  # bf16 rounding of the output
    nk[:, :, int(slots[-1]) + 1:] = 1e4  # entries past the last slot must not matter
    out2, _ = sparse_attention_with_new_tokens(q, keys, values, pos, total, nk, nv, slots, 0.125)
    assert rel_rms(out2, rout) < tol(torch.bfloat16)


def test_fused_attention_rejects_bad_shapes():
    q, keys, values, pos, total, nk, nv, slots = make_case(1, 2, 2, 1, 64, 64, 8, "fp32", seed=1)
    with pytest.raises(ValueError, match="slots"):
        sparse_attention_with_new_tokens(q, keys, values, pos, total, nk, nv, slots.repeat(2), 0.1)
    with pytest.raises(ValueError, match="new_keys"):
        sparse_attention_with_new_tokens(q, keys, values, pos, total, nk[:, :1], nv[:, :1], slots, 0.1)
    with pytest.raises(ValueError, match="out must be"):
        sparse_attention_with_new_tokens(q, keys, values, pos, total, nk, nv, slots, 0.1,
                                         out=torch.empty(1, 4, 2, 64, device=DEV))


@pytest.mark.parametrize("with_allowed", [True, False])
def test_positions_kernel_counts_exact_bytes(with_allowed):
    gen = torch.Generator().manual_seed(5)
    b, hk, cf, n = 2, 3, 40, 900
    seglen = torch.randint(0, 12, (b, hk, cf + 2), generator=gen).to(torch.int32)
    lows = torch.cumsum(torch.full((hk, cf + 2), 20, dtype=torch.int32), dim=1) - 20
    allowed = (torch.rand(b, hk, cf, generator=gen) < 0.4).to(torch.uint8) if with_allowed else None
    acc = torch.tensor([5, 7], dtype=torch.int64, device=DEV)  # adds to what is there
    args = (seglen.to(DEV), lows.to(DEV), n)
    alw = allowed.to(DEV) if allowed is not None else None
    pos, total, read = kept_positions(*args, allowed=alw, num_coarse=6, counter=(acc, 512, 260, n * 512))
    assert torch.equal(total.cpu(), seglen.sum(-1).to(torch.int32))
    cents = (allowed.sum(-1) + 6) if with_allowed else torch.full((b, hk), 6)
    if with_allowed:
        assert torch.equal(read.cpu(), cents)
    want_read = 5 + int(seglen.sum()) * 512 + int(cents.sum()) * 260
    assert acc.tolist() == [want_read, 7 + b * hk * n * 512]
    with pytest.raises(ValueError, match="int64"):
        kept_positions(*args, counter=(acc.double(), 1, 1, 1))


# ----------------------------------------------------------------------------------------------- the cache


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, filler):
    from sqattn_index.config import SqueezeConfig
    from sqattn_index.engine import SqueezedEngine
    from sqattn_index.model_loading import load_local_model

    local = load_local_model(tiny_llama_dir, device=DEV, dtype=torch.float32, progress=False)
    engine = SqueezedEngine(local, SqueezeConfig(keys_per_fine=8, fine_per_coarse=4, window_tokens=16,
                                                 prefill_chunk=100, backend="torch"))
    corpus, _ = engine.build_corpus(filler(3, "The vault code is 4821.", at=1))
    return engine, corpus


@pytest.mark.parametrize("static", [True, False], ids=["static-buffers", "growing-cache"])
@pytest.mark.parametrize("keep,mode", [(0.3, "budget"), (1.0, "budget")])
def test_cache_triton_path_matches_torch_path(tiny, static, keep, mode):
    """Question prefill + 3 one-token steps through SqueezedCache: Triton ops (fused epilogue, in-kernel
    budget counter) give the torch path's logits and the same KV budget."""
    from sqattn_index.hf_attention import SqueezedCache
    from sqattn_index.kernels.dispatch import get_ops
    from sqattn_index.selection import SelectionSpec

    engine, corpus = tiny
    n = corpus.num_tokens
    suffix = engine.layout.suffix_ids("What is the vault code?")
    spec = SelectionSpec(keep=keep, mode=mode)
    caches = []
    for ops in (get_ops("torch"), get_ops("triton")):
        cache = SqueezedCache(corpus, spec, ops, capacity=len(suffix) + 4 if static else None)
        cache.per_token = False
        caches.append(cache)
    logits = []
    for cache in caches:
        if static:
            cache.set_slots(0, len(suffix))
        logits.append(engine._forward(cache, suffix, n))
    assert (logits[0] - logits[1]).abs().max().item() < 1e-3
    tok = int(logits[0][-1].argmax())
    for i in range(3):
        step = []
        for cache in caches:
            if static:
                cache.set_slots(len(suffix) + i, 1)
            step.append(engine._forward(cache, torch.tensor([tok]), n + len(suffix) + i))
        assert (step[0] - step[1]).abs().max().item() < 1e-3
        tok = int(step[0][-1].argmax())
    assert caches[1].kv_budget == pytest.approx(caches[0].kv_budget)
    if keep < 1.0:
        assert caches[1].kv_budget < 0.9


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("hk,g,n,cap,dt", [(8, 4, 32768, 600, "bf16"), (32, 1, 16384, 300, "fp16"),
                                           (8, 4, 4096, 64, "fp32")])
def test_gpu_fused_attention_real_sizes(hk, g, n, cap, dt):
    q, keys, values, pos, total, nk, nv, slots = make_case(1, hk, g, 1, n, 128, cap, dt, seed=n)
    scale = 128 ** -0.5
    out, lse = sparse_attention_with_new_tokens(q, keys, values, pos, total, nk, nv, slots, scale)
    rout, rlse = ref.sparse_attention_with_new_tokens_ref(q, keys, values, pos, total, nk, nv, slots, scale)
    assert rel_rms(out, rout) < tol(q.dtype)
    assert (lse - rlse).abs().max() < 50 * tol(q.dtype)


def test_merge_with_new_tokens_takes_a_precomputed_partial():
    """One dense partial (as the FlashAttention baseline gives, 16-bit) merged with the new tokens."""
    from sqattn_index.kernels.fused_attention import merge_with_new_tokens

    q, keys, values, pos, total, nk, nv, slots = make_case(2, 2, 3, 2, 120, 64, 10, "bf16", seed=9)
    b, hq, t, d = q.shape
    full = torch.arange(120, dtype=torch.int32, device=DEV).expand(b, 2, 120)
    every = torch.full((b, 2), 120, dtype=torch.int32, device=DEV)
    dense, dlse = ref.sparse_attention_ref(q, keys, values, torch.zeros(b, 2, 1, dtype=torch.int64, device=DEV),
                                           torch.full((b, 2, 1), 120, device=DEV), torch.ones(b, 2, device=DEV), 0.125)
    part_o = dense.to(torch.bfloat16).reshape(b, 2, 1, 3 * t, d)  # grouped rows, one split
    part_l = dlse.reshape(b, 2, 1, 3 * t)
    out, lse = merge_with_new_tokens(part_o, part_l, q, nk, nv, slots, 0.125)
    rout, rlse = ref.sparse_attention_with_new_tokens_ref(q, keys, values, full, every, nk, nv, slots, 0.125)
    assert rel_rms(out, rout) < 1e-2 and (lse - rlse).abs().max() < 1e-3
    with pytest.raises(ValueError, match="part_out"):
        merge_with_new_tokens(part_o[:, :, :, :-1], part_l, q, nk, nv, slots, 0.125)
