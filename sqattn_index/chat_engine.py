"""``SqueezedChatEngine``: multi-turn chat over the cached corpus.

The corpus is read sparsely (``keep`` of its KV); the conversation so far is part of the per-question suffix
and is attended densely. Old turns are dropped, oldest first, when corpus + history + reply would exceed
the model's positions. Every reply carries ``source_nodes`` ranked by the attention its question put on them.
"""

from __future__ import annotations

import asyncio
from threading import Thread
from typing import Any, AsyncIterator, Iterator, List, Optional

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
from llama_index.core.chat_engine.types import AgentChatResponse, BaseChatEngine, StreamingAgentChatResponse

from .config import check_keep
from .errors import ConfigError
from .llm import messages_to_turns
from .query_engine import answer_metadata, decode_settings, with_docstore_nodes

__all__ = ["SqueezedChatEngine", "ChatHistory"]


class ChatHistory:
    """The conversation as ``ChatMessage`` objects; duck-types the memory that LlamaIndex streaming writes to."""

    def __init__(self, messages: Optional[List[ChatMessage]] = None):
        self.messages: List[ChatMessage] = list(messages or [])

    def put(self, message: ChatMessage) -> None:
        self.messages.append(message)

    async def aput(self, message: ChatMessage) -> None:
        self.put(message)

    def set(self, messages: List[ChatMessage]) -> None:
        self.messages = list(messages)

    def get_all(self) -> List[ChatMessage]:
        return list(self.messages)

    def reset(self) -> None:
        self.messages = []

    def turns(self) -> list[tuple[str, str]]:
        """Completed (user, assistant) pairs."""
        if not self.messages:
            return []
        probe = self.messages + [ChatMessage(role=MessageRole.USER, content="?")]
        return messages_to_turns(probe)[1]


class SqueezedChatEngine(BaseChatEngine):
    """Chat engine over a ``SqueezedKVStore``.

    Args:
        vector_store: the store (its LLM attached).
        keep: fraction of the corpus KV attended (1.0 = dense).
        max_new_tokens, temperature, top_p, seed: decoding settings (default: the LLM's).
        chat_history: messages to start from.
        max_turns: most past (user, assistant) turns kept in the prompt (None = as many as fit).
        source_top_k: how many ranked source nodes per reply (None = all).
        docstore: where to look up the full node objects for ``source_nodes`` (optional).
    """

    def __init__(self, vector_store: Any, keep: float = 0.1, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 chat_history: Optional[List[ChatMessage]] = None, max_turns: int | None = None,
                 source_top_k: int | None = 5, docstore: Any = None):
        llm = vector_store.llm
        if llm is None:
            raise ConfigError("the vector store has no SqueezedLLM attached; build the chat engine from an index.")
        self._store = vector_store
        self._keep = check_keep(keep)
        self._decode = decode_settings(llm, max_new_tokens, temperature, top_p, seed)
        if max_turns is not None and (not isinstance(max_turns, int) or max_turns < 0):
            raise ConfigError(f"max_turns must be an int >= 0 or None; got {max_turns!r}.")
        if source_top_k is not None and (not isinstance(source_top_k, int) or source_top_k < 1):
            raise ConfigError(f"source_top_k must be a positive int or None; got {source_top_k!r}.")
        self._max_turns, self._top_k, self._docstore = max_turns, source_top_k, docstore
        self._history = ChatHistory(chat_history)

    @property
    def keep(self) -> float:
        return self._keep

    @keep.setter
    def keep(self, value: float) -> None:
        self._keep = check_keep(value)

    @property
    def chat_history(self) -> List[ChatMessage]:
        return self._history.get_all()

    def reset(self) -> None:
        self._history.reset()

    # -------------------------------------------------------------------------------------------- helpers
    def _prepare(self, message: str, chat_history: Optional[List[ChatMessage]]):
        """Set the history and fit it into the model's positions; returns (the store snapshot to answer on, the
        (user, assistant) turns to use)."""
        if not isinstance(message, str) or not message.strip():
            raise ConfigError(f"a chat message must be a non-empty string; got {message!r}.")
        if chat_history is not None:
            self._history.set(chat_history)
        turns = self._history.turns()
        if self._max_turns is not None:
            turns = turns[len(turns) - self._max_turns:] if self._max_turns else []
        self._store.require_corpus()
        snap = self._store.snapshot()  # one version per reply: a concurrent writer never mixes into it
        room = self._store.llm.local.max_positions - snap.require_corpus().num_tokens - self._decode["max_new_tokens"]
        while turns and len(snap.engine.layout.suffix_ids(message, turns)) > room:
            turns = turns[1:]
        return snap, turns

    def _sources(self, snap, node_mass: list[float]):
        return with_docstore_nodes(snap.rank(node_mass, self._top_k), self._docstore)

    def _stream(self, message: str, snap, turns: list[tuple[str, str]]):
        """(sources, metadata, generator of ChatResponse) for one reply."""
        store = snap
        node_mass = snap.node_mass(message, keep=self._keep, history=turns)
        stream = snap.engine.stream(snap.require_corpus(), message, keep=self._keep, history=turns, **self._decode)
        metadata = answer_metadata(snap, self._keep, node_mass=node_mass)

        def gen() -> Iterator[ChatResponse]:
            text = ""
            for delta in stream:
                text += delta
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)
            metadata.update(answer_metadata(store, self._keep, stream.answer, node_mass))

        return self._sources(snap, node_mass), metadata, gen()

    # ----------------------------------------------------------------------------------------------- chat
    def chat(self, message: str, chat_history: Optional[List[ChatMessage]] = None) -> AgentChatResponse:
        """Reply to ``message`` given the conversation so far (or ``chat_history``)."""
        snap, turns = self._prepare(message, chat_history)
        store = snap
        answer = snap.engine.answer(snap.require_corpus(), message, keep=self._keep, history=turns,
                                    spans=list(snap.spans), **self._decode)
        self._history.put(ChatMessage(role=MessageRole.USER, content=message))
        self._history.put(ChatMessage(role=MessageRole.ASSISTANT, content=answer.text))
        return AgentChatResponse(response=answer.text, source_nodes=self._sources(snap, answer.node_mass),
                                 metadata=answer_metadata(store, self._keep, answer, answer.node_mass))

    def stream_chat(self, message: str,
                    chat_history: Optional[List[ChatMessage]] = None) -> StreamingAgentChatResponse:
        """Stream the reply; ``response_gen`` yields text deltas, the history is updated when it ends."""
        snap, turns = self._prepare(message, chat_history)
        sources, metadata, gen = self._stream(message, snap, turns)
        self._history.put(ChatMessage(role=MessageRole.USER, content=message))  # the reply follows when done
        response = StreamingAgentChatResponse(chat_stream=gen, source_nodes=sources)
        response.metadata = metadata  # not a dataclass field of StreamingAgentChatResponse; set for callers
        thread = Thread(target=response.write_response_to_history, args=(self._history,), daemon=True)
        response.write_response_to_history_thread = thread
        thread.start()
        return response

    async def achat(self, message: str, chat_history: Optional[List[ChatMessage]] = None) -> AgentChatResponse:
        return await asyncio.to_thread(self.chat, message, chat_history)

    async def astream_chat(self, message: str,
                           chat_history: Optional[List[ChatMessage]] = None) -> StreamingAgentChatResponse:
        """Async streaming: ``async for delta in response.async_response_gen()``."""
        snap, turns = await asyncio.to_thread(self._prepare, message, chat_history)
        sources, metadata, gen = await asyncio.to_thread(self._stream, message, snap, turns)
        self._history.put(ChatMessage(role=MessageRole.USER, content=message))

        async def agen() -> AsyncIterator[ChatResponse]:
            done = object()
            while True:
                item = await asyncio.to_thread(next, gen, done)
                if item is done:
                    return
                yield item

        response = StreamingAgentChatResponse(achat_stream=agen(), source_nodes=sources)
        response.metadata = metadata
        response.awrite_response_to_history_task = asyncio.create_task(
            response.awrite_response_to_history(self._history))
        return response
