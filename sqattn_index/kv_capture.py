"""KV capture: chunked prefill of the fixed prefix, keeping each layer's post-RoPE keys and values and the
observation window's queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .errors import ContextTooLongError
from .hf_attention import QueryCapture, capturing
from .model_loading import LocalModel

__all__ = ["CapturedKV", "capture_kv"]


@dataclass
class CapturedKV:
    """keys/values: one [Hk, N, D] tensor each per layer (model dtype, post-RoPE);
    window_queries: one [Hq, W, D] tensor per layer (post-RoPE queries of the last W tokens)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    window_queries: list[torch.Tensor]


@torch.inference_mode()
def capture_kv(local: LocalModel, input_ids: torch.Tensor, chunk: int = 2048, window: int = 64,
               progress: bool = False) -> CapturedKV:
    """Prefill ``input_ids`` [N] in chunks of ``chunk`` tokens and return every layer's KV."""
    n = int(input_ids.shape[0])
    if n >= local.max_positions:
        raise ContextTooLongError(
            f"the fixed context has {n} tokens but the model has {local.max_positions} positions (and needs room "
            "for the question); split the corpus into several indexes or use a longer-context model."
        )
    if n == 0:
        raise ContextTooLongError("the fixed context is empty; add at least one non-empty document.")
    cache = DynamicCache()
    capture = QueryCapture(window)
    ids = input_ids.to(local.device).view(1, n)
    starts = range(0, n, chunk)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="prefill", unit="tok")
    with capturing(capture):
        for start in starts:
            end = min(start + chunk, n)
            local.model(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True, logits_to_keep=1)
            if bar is not None:
                bar.update(end - start)
    if bar is not None:
        bar.close()
    keys, values = [], []
    for layer in cache.layers:
        keys.append(layer.keys[0])  # [Hk, N, D]
        values.append(layer.values[0])
    queries = [capture.queries[i] for i in range(len(keys))]
    return CapturedKV(keys, values, queries)
