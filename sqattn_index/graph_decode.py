"""One-token decode steps of a Hugging Face model over a ``SqueezedCache``, captured once as a CUDA graph.

At batch 1 an eager decode step is bound by kernel launches (hundreds per step: the model's own ops plus the
lookup, positions, sparse attention and merge of every layer), not by the bytes that squeezed attention
saves. The squeezed path has no host sync (the lookup decides on the device, positions are compacted on the
device, the KV budget accumulates in place) and ``SqueezedCache(capacity=...)`` keeps the new tokens in
static buffers, so the whole step can be captured and replayed:

    cache = SqueezedCache(corpus, spec, ops, capacity=len(question) + max_new_tokens)
    cache.set_slots(0, len(question)); logits = model(question at positions N.., past_key_values=cache)  # eager
    step = GraphDecodeStep(model, cache, fixed_len=N)
    logits = step(token_id, index)   # index = new tokens before this one (len(question) for the first)

Only the input token, its position and its slot change between replays; they are copied into the graph's
static inputs. The first call captures (after a warm-up on a side stream), later calls replay.
"""

from __future__ import annotations

import torch

from .hf_attention import SqueezedCache, active_cache

__all__ = ["GraphDecodeStep"]


class GraphDecodeStep:
    """Callable ``(token_id, index) -> logits [V]`` (float32) for one new token at slot ``index``."""

    def __init__(self, model: torch.nn.Module, cache: SqueezedCache, fixed_len: int, warmup: int = 2):
        if cache.capacity is None:
            raise ValueError("GraphDecodeStep needs a SqueezedCache built with capacity=... (static new-token "
                             "buffers); got one with growing buffers.")
        dev = cache._bytes.device
        if dev.type != "cuda":
            raise ValueError(f"CUDA graphs need the cache on a CUDA device; it is on {dev}.")
        self.model, self.cache, self.fixed_len, self.warmup = model, cache, fixed_len, warmup
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _set(self, token_id: int, index: int) -> None:
        if index >= self.cache.capacity:
            raise ValueError(f"new token {index} exceeds the cache capacity {self.cache.capacity}.")
        self.ids.fill_(int(token_id))
        self.pos.fill_(self.fixed_len + int(index))
        self.slot.fill_(int(index))
        self.cache.slots = self.slot
        self.cache.new_tokens = index + 1

    def _forward(self) -> torch.Tensor:
        with active_cache(self.cache):
            out = self.model(input_ids=self.ids, position_ids=self.pos, past_key_values=self.cache, use_cache=True,
                             logits_to_keep=1)
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def eager(self, token_id: int, index: int) -> torch.Tensor:
        """The same step run eagerly through the same static inputs (no capture, no replay): the check that
        a replay computes what eager execution does."""
        self._set(token_id, index)
        return self._forward()

    @torch.inference_mode()
    def __call__(self, token_id: int, index: int) -> torch.Tensor:
        self._set(token_id, index)
        if self.graph is None:
            # Warm-up forwards write this token's K/V into its slot and add to the budget; the captured forward
            # (and every replay) rewrites the slot. The budget is reset to its value before the warm-up.
            before = self.cache._bytes.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._forward()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward()
            self.cache._bytes.copy_(before)
        self.graph.replay()
        return self.logits.clone()
