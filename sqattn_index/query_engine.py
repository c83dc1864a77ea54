"""``SqueezedQueryEngine``: answers a question over the whole cached corpus with squeezed attention.

No retrieval step and no context in the prompt: the model attends sparsely (``keep`` of the corpus KV) to the
precomputed keys/values of every node. ``source_nodes`` are the nodes ranked by the attention the
question put on them (score = attention lift, see ``SqueezedKVStore``); ``metadata`` reports what it cost.
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, Iterator, List, Optional

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.response.schema import RESPONSE_TYPE, Response, StreamingResponse
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.schema import NodeWithScore, QueryBundle

from .config import check_keep
from .errors import ConfigError

__all__ = ["SqueezedQueryEngine", "answer_metadata"]


def answer_metadata(store: Any, keep: float, answer: Any = None, node_mass: list[float] | None = None) -> dict:
    """The ``metadata`` of a reply: keep, KV budget, seconds, token counts (KV/timing keys None until done),
    and ``index_version``, the version of the store snapshot the reply was computed on.

    ``store``: the ``StoreSnapshot`` the reply used (a ``SqueezedKVStore`` means its current snapshot)."""
    snap = store.snapshot() if hasattr(store, "snapshot") else store
    meta: Dict[str, Any] = {"keep": keep, "kv_budget": None, "seconds": None, "prompt_tokens": None,
                            "new_tokens": None, "finish_reason": None,
                            "corpus_tokens": snap.corpus.num_tokens if snap.corpus is not None else 0,
                            "index_version": snap.version}
    store = snap
    if node_mass is not None:
        meta["node_mass"] = dict(zip(store.node_ids, node_mass))
    if answer is not None:
        meta.update(kv_budget=answer.kv_budget, seconds=dict(answer.seconds), prompt_tokens=answer.prompt_tokens,
                    new_tokens=len(answer.token_ids), finish_reason=answer.finish_reason)
    return meta


def with_docstore_nodes(ranked: List[NodeWithScore], docstore: Any) -> List[NodeWithScore]:
    """``ranked`` with each node replaced by the docstore's copy when it has one."""
    if docstore is None:
        return ranked
    out = []
    for r in ranked:
        node = docstore.get_node(r.node.node_id, raise_error=False) or r.node
        out.append(NodeWithScore(node=node, score=r.score))
    return out



def decode_settings(llm, max_new_tokens, temperature, top_p, seed) -> dict:
    """Generation settings of an engine: each given value, else the LLM's own (shared with the chat engine)."""
    out = {"max_new_tokens": int(max_new_tokens if max_new_tokens is not None else llm.max_new_tokens),
           "temperature": float(temperature if temperature is not None else llm.temperature),
           "top_p": float(top_p if top_p is not None else llm.top_p),
           "seed": seed if seed is not None else llm.seed}
    if out["max_new_tokens"] < 1:
        raise ConfigError(f"max_new_tokens must be >= 1; got {max_new_tokens!r}.")
    return out

class SqueezedQueryEngine(BaseQueryEngine):
    """Query engine over a ``SqueezedKVStore``.

    Args:
        vector_store: the store (its LLM attached).
        keep: fraction of the corpus KV attended per layer and head (1.0 = dense).
        streaming: return ``StreamingResponse`` (text deltas) instead of ``Response``.
        max_new_tokens, temperature, top_p, seed: decoding settings (default: the LLM's).
        source_top_k: how many ranked source nodes to return (None = all).
        docstore: where to look up the full node objects for ``source_nodes`` (optional).
    """

    def __init__(self, vector_store: Any, keep: float = 0.1, streaming: bool = False,
                 max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 seed: int | None = None, source_top_k: int | None = 5, docstore: Any = None,
                 callback_manager: Optional[CallbackManager] = None):
        self._store = vector_store
        self._keep = check_keep(keep)
        self._streaming = bool(streaming)
        llm = vector_store.llm
        if llm is None:
            raise ConfigError("the vector store has no SqueezedLLM attached; build the query engine from an index.")
        self._decode = decode_settings(llm, max_new_tokens, temperature, top_p, seed)
        if source_top_k is not None and (not isinstance(source_top_k, int) or source_top_k < 1):
            raise ConfigError(f"source_top_k must be a positive int or None; got {source_top_k!r}.")
        self._top_k = source_top_k
        self._docstore = docstore
        super().__init__(callback_manager=callback_manager)

    @property
    def keep(self) -> float:
        return self._keep

    def _get_prompt_modules(self) -> Dict[str, Any]:
        return {}

    def _sources(self, snap: Any, node_mass: list[float]) -> List[NodeWithScore]:
        return with_docstore_nodes(snap.rank(node_mass, self._top_k), self._docstore)

    def _snapshot(self):
        """The store's current snapshot (one per question: a concurrent writer never mixes versions into it)."""
        self._store.require_corpus()
        return self._store.snapshot()

    def retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        """The nodes the question attends to most (dense attention lift), without generating."""
        snap = self._snapshot()
        return self._sources(snap, snap.node_mass(query_bundle.query_str, keep=1.0))

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        question = query_bundle.query_str
        snap = self._snapshot()
        corpus, engine, spans = snap.require_corpus(), snap.engine, list(snap.spans)
        if not self._streaming:
            answer = engine.answer(corpus, question, keep=self._keep, spans=spans, **self._decode)
            return Response(response=answer.text, source_nodes=self._sources(snap, answer.node_mass),
                            metadata=answer_metadata(snap, self._keep, answer, answer.node_mass))
        node_mass = snap.node_mass(question, keep=self._keep)  # what the answer's prefill will attend to
        stream = engine.stream(corpus, question, keep=self._keep, **self._decode)
        metadata = answer_metadata(snap, self._keep, node_mass=node_mass)

        def deltas() -> Iterator[str]:
            yield from stream
            metadata.update(answer_metadata(snap, self._keep, stream.answer, node_mass))

        return StreamingResponse(response_gen=deltas(), source_nodes=self._sources(snap, node_mass), metadata=metadata)

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        return await asyncio.to_thread(self._query, query_bundle)
