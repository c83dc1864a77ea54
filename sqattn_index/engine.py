"""The engine: build a squeezed corpus from texts, then answer, stream and score questions over it.

    engine = SqueezedEngine(load_local_model())
    corpus, spans = engine.build_corpus(["doc one ...", "doc two ..."])
    answer = engine.answer(corpus, "What ...?", keep=0.1, spans=spans)   # Answer(text, kv_budget, node_mass, ...)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .calibration import calibrate_layer
from .clustering import build_layer_clusters
from .config import SqueezeConfig
from .corpus_kv import CorpusKV
from .errors import ContextTooLongError
from .hf_attention import SqueezedCache, active_cache
from .kv_capture import capture_kv
from .model_loading import LocalModel
from .prompt_layout import DEFAULT_INSTRUCTIONS, PromptLayout
from .selection import SelectionSpec

__all__ = ["SqueezedEngine", "Answer", "AnswerStream", "Score", "get_backend_ops"]


def get_backend_ops(backend: str, device: torch.device):
    """The kernel ops for ``backend`` ("auto": Triton on CUDA, torch reference elsewhere)."""
    from .kernels.dispatch import get_ops

    if backend == "auto" and device.type != "cuda":
        backend = "torch"
    return get_ops(backend)


@dataclass
class Answer:
    """One generated answer and what it cost."""

    text: str
    token_ids: list[int]
    keep: float
    kv_budget: float  # bytes of fixed K/V + centroids read over dense, all layers and steps
    node_mass: list[float] | None  # attention mass of each node's span during the question prefill
    prompt_tokens: int
    finish_reason: str  # "eos" | "length"
    seconds: dict = field(default_factory=dict)  # ttft, decode_per_token, total


@dataclass
class Score:
    """Log-likelihood of a given reply as the assistant's answer."""

    logprob_sum: float
    num_tokens: int
    kv_budget: float

    @property
    def nll_per_token(self) -> float:
        return -self.logprob_sum / max(self.num_tokens, 1)


class SqueezedEngine:
    """Builds corpora and answers over them with one local model and one ``SqueezeConfig``."""

    def __init__(self, local: LocalModel, config: SqueezeConfig | None = None,
                 instructions: str = DEFAULT_INSTRUCTIONS):
        self.local = local
        self.config = config or SqueezeConfig()
        self.layout = PromptLayout(local.tokenizer, instructions)
        self.ops = get_backend_ops(self.config.backend, local.device)
        self.scale = local.head_dim ** -0.5
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.local.model.generation_config, "eos_token_id", None),
                    self.local.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(i) for i in src)
        return ids

    # ----------------------------------------------------------------------------------------------- build
    def build_corpus(self, texts: list[str], progress: bool = False) -> tuple[CorpusKV, list[tuple[int, int]]]:
        """Prefill, cluster and calibrate ``texts`` (in order) as one fixed context."""
        cfg = self.config
        fixed = self.layout.fixed_prompt(texts)
        t0 = time.perf_counter()
        captured = capture_kv(self.local, fixed.input_ids, cfg.prefill_chunk, cfg.window_tokens, progress)
        t1 = time.perf_counter()
        layers = []
        it = range(len(captured.keys))
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="clustering", unit="layer")
        for i in it:
            layers.append(build_layer_clusters(captured.keys[i], captured.values[i], cfg.sink_tokens,
                                               cfg.window_tokens, cfg.keys_per_fine, cfg.fine_per_coarse,
                                               cfg.kmeans_iters, cfg.seed + i))
        t2 = time.perf_counter()
        for layer, queries in zip(layers, captured.window_queries):
            calibrate_layer(layer, queries, cfg.keep_ladder, self.scale, cfg.coarse_slack,
                            variance_term=cfg.variance_term, always_in_normaliser=cfg.always_in_normaliser,
                            hierarchical=cfg.hierarchical)
        t3 = time.perf_counter()
        corpus = CorpusKV(fixed.input_ids, layers, tuple(cfg.keep_ladder),
                          {"prefill": t1 - t0, "clustering": t2 - t1, "calibration": t3 - t2})
        return corpus, fixed.spans

    def append_texts(self, corpus: CorpusKV, spans: list[tuple[int, int]], texts: list[str]):
        """Exact insert: ``texts`` prefilled after the corpus; returns (new corpus, all spans)."""
        from .updates import append_texts

        return append_texts(self, corpus, spans, texts)

    def remove_texts(self, corpus: CorpusKV, spans: list[tuple[int, int]], indices: list[int]):
        """Exact delete of the texts at ``indices``; returns (new corpus, remaining spans)."""
        from .updates import remove_texts

        return remove_texts(self, corpus, spans, indices)

    # -------------------------------------------------------------------------------------------- answer
    def _check_room(self, corpus: CorpusKV, suffix_len: int, new_tokens: int) -> None:
        total = corpus.num_tokens + suffix_len + new_tokens
        if total > self.local.max_positions:
            raise ContextTooLongError(
                f"fixed context ({corpus.num_tokens} tokens) + question ({suffix_len}) + up to {new_tokens} new "
                f"tokens = {total} exceeds the model's {self.local.max_positions} positions; shorten the question "
                "or lower max_new_tokens."
            )

    def new_cache(self, corpus: CorpusKV, keep: float, capacity: int | None = None) -> SqueezedCache:
        """A fresh ``SqueezedCache`` over ``corpus`` for one answer at ``keep`` (``capacity``: static buffers
        for that many new tokens, as CUDA-graph decoding needs)."""
        cache = SqueezedCache(corpus, SelectionSpec.from_config(keep, self.config), self.ops, capacity=capacity)
        cache.per_token = self.config.per_token_selection
        return cache

    def graphs_enabled(self, corpus: CorpusKV) -> bool:
        """Whether decode steps replay a CUDA graph: ``config.cuda_graphs``, the corpus on CUDA, Triton ops."""
        on_cuda = bool(corpus.layers) and corpus.layers[0].keys.device.type == "cuda"
        return self.config.cuda_graphs and on_cuda and getattr(self.ops, "backend", "torch") == "triton"

    def _forward(self, cache: SqueezedCache, ids: torch.Tensor, start: int, logits_to_keep: int = 1):
        pos = torch.arange(start, start + ids.shape[-1], device=self.local.device).unsqueeze(0)
        with active_cache(cache):
            out = self.local.model(input_ids=ids.view(1, -1).to(self.local.device), position_ids=pos,
                                   past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)
        return out.logits[0].float()  # [logits_to_keep, V]

    def stream(self, corpus: CorpusKV, question: str, keep: float = 0.1, max_new_tokens: int = 128,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               history: list[tuple[str, str]] | None = None, spans: list[tuple[int, int]] | None = None,
               ) -> "AnswerStream":
        """An iterator of text deltas; its ``answer`` is set once exhausted."""
        return AnswerStream(self, corpus, question, keep, max_new_tokens, temperature, top_p, seed, history, spans)

    def answer(self, corpus: CorpusKV, question: str, keep: float = 0.1, **kwargs) -> Answer:
        stream = self.stream(corpus, question, keep, **kwargs)
        for _ in stream:
            pass
        return stream.answer

    @torch.inference_mode()
    def score(self, corpus: CorpusKV, question: str, reply: str, keep: float = 0.1,
              history: list[tuple[str, str]] | None = None) -> Score:
        """Summed log-probability of ``reply`` as the assistant's answer to ``question``."""
        suffix = self.layout.suffix_ids(question, history)
        reply_ids = self.layout.reply_ids(question, reply, history)
        self._check_room(corpus, len(suffix) + len(reply_ids), 0)
        ids = torch.cat([suffix, reply_ids])
        cache = self.new_cache(corpus, keep)
        logits = self._forward(cache, ids, corpus.num_tokens, logits_to_keep=len(reply_ids) + 1)[:-1]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, reply_ids.to(logits.device).view(-1, 1))
        return Score(float(logp.sum()), int(len(reply_ids)), cache.kv_budget)

    @torch.inference_mode()
    def attention_mass(self, corpus: CorpusKV, question: str, keep: float = 1.0,
                       history: list[tuple[str, str]] | None = None) -> torch.Tensor:
        """Mean attention probability [N] the question's tokens put on each fixed token (original order)."""
        suffix = self.layout.suffix_ids(question, history)
        self._check_room(corpus, len(suffix), 0)
        cache = self.new_cache(corpus, keep)
        cache.collect_mass = True
        self._forward(cache, suffix, corpus.num_tokens)
        return cache.normalised_mass()


def span_mass(mass: torch.Tensor | None, spans: list[tuple[int, int]] | None) -> list[float] | None:
    """Attention mass summed over each [start, end) span."""
    if mass is None or spans is None:
        return None
    cum = torch.cat([torch.zeros(1, device=mass.device), mass.double().cumsum(0)])
    return [float(cum[e] - cum[s]) for s, e in spans]


class AnswerStream:
    """Iterate for text deltas; ``answer`` holds the finished ``Answer``."""

    def __init__(self, engine: SqueezedEngine, corpus, question, keep, max_new_tokens, temperature, top_p, seed,
                 history, spans):
        self.engine = engine
        self.corpus = corpus
        self.spec = SelectionSpec.from_config(keep, engine.config)
        self.suffix = engine.layout.suffix_ids(question, history)
        engine._check_room(corpus, len(self.suffix), max_new_tokens)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        self.spans = spans
        self.answer: Answer | None = None

    def _pick(self, logits: torch.Tensor) -> int:
        if self.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cut = sorted_p.cumsum(-1) - sorted_p > self.top_p
            sorted_p[cut] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.generator))

    @torch.inference_mode()
    def __iter__(self) -> Iterator[str]:
        eng, corpus = self.engine, self.corpus
        tok = eng.local.tokenizer
        graphs = eng.graphs_enabled(corpus) and self.max_new_tokens > 1
        cache = eng.new_cache(corpus, self.spec.keep,
                              capacity=len(self.suffix) + self.max_new_tokens if graphs else None)
        cache.collect_mass = self.spans is not None
        t0 = time.perf_counter()
        if graphs:
            from .graph_decode import GraphDecodeStep

            cache.set_slots(0, len(self.suffix))
            graph_step = GraphDecodeStep(eng.local.model, cache, corpus.num_tokens)
        logits = eng._forward(cache, self.suffix, corpus.num_tokens)[-1]
        mass = span_mass(cache.normalised_mass(), self.spans)
        cache.collect_mass = False
        t_first = time.perf_counter()
        ids: list[int] = []
        text = ""
        finish = "length"
        pos = corpus.num_tokens + len(self.suffix)
        for step in range(self.max_new_tokens):
            nxt = self._pick(logits)
            if nxt in eng.eos_ids:
                finish = "eos"
                break
            ids.append(nxt)
            new_text = tok.decode(ids, skip_special_tokens=True)
            if not new_text.endswith("\ufffd"):
                delta, text = new_text[len(text):], new_text
                if delta:
                    yield delta
            if step + 1 < self.max_new_tokens:
                if graphs:
                    logits = graph_step(nxt, pos - corpus.num_tokens)
                else:
                    logits = eng._forward(cache, torch.tensor([nxt]), pos)[-1]
                pos += 1
        t_end = time.perf_counter()
        final = tok.decode(ids, skip_special_tokens=True)
        if final != text:
            yield final[len(text):]
        self.answer = Answer(
            text=final.strip(), token_ids=ids, keep=self.spec.keep, kv_budget=cache.kv_budget, node_mass=mass,
            prompt_tokens=len(self.suffix), finish_reason=finish,
            seconds={"ttft": t_first - t0, "decode_per_token": (t_end - t_first) / max(len(ids), 1),
                     "total": t_end - t0},
        )
