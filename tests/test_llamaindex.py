"""The LlamaIndex layer on the embedded SmolLM2 model, offline: index, query/chat engines, retriever,
persistence and reload in a fresh process, instrumentation, and no use of Settings.llm / embed_model."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from llama_index.core import Document, Settings, StorageContext, load_index_from_storage
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.query import QueryEndEvent, QueryStartEvent

import sqattn_index as sq
from sqattn_index.errors import ConfigError, ContextTooLongError, CorruptIndexError

pytestmark = pytest.mark.slow

FACT = "The access code for the Amber vault is 4821."
QUESTION = "What is the access code for the Amber vault?"
KEEP = 0.3
TOKENS = 16
CONFIG = dict(keep_ladder=(0.3, 0.1), kmeans_iters=4)

BLOCK_SOCKETS = """
import socket
def _blocked(*a, **k):
    raise OSError("network access is blocked in this test")
socket.socket.connect = _blocked
socket.create_connection = _blocked
"""


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No network: sockets refuse to connect, Hugging Face runs offline."""
    def blocked(*args, **kwargs):
        raise OSError("network access is blocked in this test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", blocked)
        mp.setattr(socket, "create_connection", blocked)
        yield


@pytest.fixture(autouse=True)
def settings_untouched():
    """Nothing resolves Settings.llm / Settings.embed_model (both default to OpenAI)."""
    yield
    assert Settings._llm is None and Settings._embed_model is None


@pytest.fixture(scope="module")
def llm(smol):
    return sq.SqueezedLLM.from_pretrained(smol, max_new_tokens=TOKENS)


@pytest.fixture(scope="module")
def docs(filler):
    return [Document(text=t, id_=f"doc{i}", metadata={"chapter": i}) for i, t in enumerate(filler(6, FACT, at=3))]


@pytest.fixture(scope="module")
def index(llm, docs):
    return sq.SqueezedKVIndex.from_documents(docs, llm=llm, config=sq.SqueezeConfig(**CONFIG))


@pytest.fixture(scope="module")
def answer(index):
    return index.as_query_engine(keep=KEEP, max_new_tokens=TOKENS).query(QUESTION)


def test_index_holds_nodes_in_token_spans(index, docs):
    store = index.vector_store
    assert isinstance(store, sq.SqueezedKVStore) and not store.stores_text and not store.is_embedding_query
    assert set(index.ref_doc_info) == {d.id_ for d in docs}
    ids = store.corpus.input_ids
    tok = index.llm.local.tokenizer
    for node, (start, end) in zip(store.nodes, store.spans):
        assert tok.decode(ids[start:end]) == node.get_content()


def test_query_response_sources_and_metadata(answer):
    assert isinstance(answer, Response) and answer.response.strip()
    assert "4821" in answer.response or "48" in answer.response
    scores = [n.score for n in answer.source_nodes]
    assert scores == sorted(scores, reverse=True)
    assert FACT in answer.source_nodes[0].node.get_content()
    meta = answer.metadata
    assert meta["keep"] == KEEP and 0.0 < meta["kv_budget"] < 0.7
    assert {"ttft", "total"} <= set(meta["seconds"]) and meta["new_tokens"] <= TOKENS


def test_streaming_matches_plain_query(index, answer):
    stream = index.as_query_engine(keep=KEEP, streaming=True, max_new_tokens=TOKENS).query(QUESTION)
    assert isinstance(stream, StreamingResponse)
    assert [n.node.node_id for n in stream.source_nodes] == [n.node.node_id for n in answer.source_nodes]
    assert "".join(stream.response_gen).strip() == answer.response
    assert stream.metadata["kv_budget"] == pytest.approx(answer.metadata["kv_budget"])


def test_aquery_and_instrumentation_events(index, answer):
    class Collect(BaseEventHandler):
        events: list = []

        def handle(self, event, **kwargs):
            if isinstance(event, (QueryStartEvent, QueryEndEvent)):
                self.events.append(event)

    handler = Collect(events=[])
    root = get_dispatcher()
    root.add_event_handler(handler)
    try:
        response = asyncio.run(index.as_query_engine(keep=KEEP, max_new_tokens=TOKENS).aquery(QUESTION))
    finally:
        root.event_handlers.remove(handler)
    assert response.response == answer.response
    kinds = [type(e).__name__ for e in handler.events]
    assert kinds == ["QueryStartEvent", "QueryEndEvent"]
    assert handler.events[1].response.response == response.response


def test_retriever_ranks_planted_fact_first(index):
    nodes = index.as_retriever(similarity_top_k=3).retrieve(QUESTION)
    assert len(nodes) == 3 and FACT in nodes[0].node.get_content()
    assert nodes[0].score > nodes[1].score >= nodes[2].score


def test_chat_engine_history_streaming_and_sources(index):
    chat = index.as_chat_engine(keep=KEEP, max_new_tokens=8)
    first = chat.chat(QUESTION)
    assert first.response and first.source_nodes and FACT in first.source_nodes[0].node.get_content()
    second = chat.stream_chat("Say that again.")
    assert second.source_nodes
    text = "".join(second.response_gen)
    assert text.strip()
    assert [m.role.value for m in chat.chat_history] == ["user", "assistant", "user", "assistant"]
    assert chat.chat_history[3].content == text.strip()

    third = asyncio.run(chat.achat("Thanks."))
    assert third.source_nodes and len(chat.chat_history) == 6

    async def astream():
        resp = await chat.astream_chat("One more time.")
        out = "".join([d async for d in resp.async_response_gen()])  # also awaits the history write
        return resp, out

    fourth, out = asyncio.run(astream())
    assert fourth.source_nodes and out.strip() and len(chat.chat_history) == 8
    chat.reset()
    assert chat.chat_history == []
    again = chat.chat(QUESTION, chat_history=[ChatMessage(role="user", content="Hi"),
                                              ChatMessage(role="assistant", content="Hello.")])
    assert again.response
    assert len(chat.chat_history) == 4


def test_chat_repl_reads_input(index, monkeypatch, capsys):
    lines = iter([QUESTION, "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    index.as_chat_engine(keep=KEEP, max_new_tokens=4).chat_repl()
    assert "Assistant:" in capsys.readouterr().out


def test_llm_unbound_bound_and_as_settings_llm(llm, index, answer):
    meta = llm.metadata
    assert meta.is_chat_model and meta.context_window == llm.local.max_positions and meta.num_output == TOKENS
    dense = llm.complete("Name a colour.", max_new_tokens=6).text
    streamed = "".join(r.delta for r in llm.stream_complete("Name a colour.", max_new_tokens=6))
    assert dense and streamed.strip() == dense
    chat = llm.chat([ChatMessage(role="user", content="Name a colour.")], max_new_tokens=6)
    assert chat.message.content == dense
    bound = llm.bind(index, keep=KEEP)
    assert bound.store is index.vector_store and llm.store is None
    assert bound.complete(QUESTION).text == answer.response
    try:
        Settings.llm = llm  # an ordinary LlamaIndex LLM
        assert Settings.llm.complete("Name a colour.", max_new_tokens=6).text == dense
    finally:
        Settings._llm = None


def test_persist_and_reload_in_fresh_process(index, answer, tmp_path):
    index.storage_context.persist(str(tmp_path))
    assert (tmp_path / "sqattn_kv" / "index.commit").is_file()
    assert not list(tmp_path.glob("*vector_store.json"))
    script = BLOCK_SOCKETS + textwrap.dedent(f"""
        import json, sys
        from llama_index.core import Settings, StorageContext, load_index_from_storage
        import sqattn_index as sq
        d = sys.argv[1]
        llm = sq.SqueezedLLM.from_pretrained(device="cpu", dtype="float32", max_new_tokens={TOKENS})
        ctx = StorageContext.from_defaults(persist_dir=d, vector_store=sq.SqueezedKVStore.from_persist_dir(d))
        index = load_index_from_storage(ctx, llm=llm)
        r = index.as_query_engine(keep={KEEP}).query({QUESTION!r})
        again = sq.load_index(d, llm=llm).as_query_engine(keep={KEEP}).query({QUESTION!r})
        print(json.dumps({{"type": type(index).__name__, "text": r.response, "again": again.response,
                          "sources": [n.node.node_id for n in r.source_nodes],
                          "settings_clean": Settings._llm is None and Settings._embed_model is None}}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["type"] == "SqueezedKVIndex" and out["settings_clean"]
    assert out["text"] == answer.response and out["again"] == answer.response
    assert out["sources"] == [n.node.node_id for n in answer.source_nodes]


def test_loaded_index_runs_with_the_llms_query_time_settings(index, llm, smol, tmp_path):
    """backend and centroid_precision describe how this process runs the index, not the stored data: a loaded
    index takes them from the LLM it is loaded with; the build settings (clustering, ladder) stay stored."""
    index.storage_context.persist(str(tmp_path))
    fp8_llm = sq.SqueezedLLM(llm.local, sq.SqueezeConfig(centroid_precision="fp8", backend="torch"),
                             max_new_tokens=TOKENS)
    loaded = sq.load_index(tmp_path, llm=fp8_llm)
    config = loaded.vector_store.engine.config
    assert config.centroid_precision == "fp8" and config.backend == "torch"
    assert config.keep_ladder == tuple(CONFIG["keep_ladder"]) and config.kmeans_iters == CONFIG["kmeans_iters"]
    assert sq.load_index(tmp_path, llm=llm).vector_store.engine.config.centroid_precision == "model"
    r = loaded.as_query_engine(keep=KEEP, max_new_tokens=TOKENS).query(QUESTION)
    assert r.response.strip() and 0.0 < r.metadata["kv_budget"] < 1.0


def test_load_errors_are_clear(index, llm, tmp_path):
    with pytest.raises(CorruptIndexError, match="no sqattn KV index"):
        sq.SqueezedKVStore.from_persist_dir(tmp_path)
    with pytest.raises(ConfigError, match="llm="):
        sq.SqueezedKVIndex.from_documents([Document(text="x")])
    index.storage_context.persist(str(tmp_path / "p"))
    with pytest.raises(ConfigError, match="SqueezedKVStore.from_persist_dir"):  # the KV store was not passed
        load_index_from_storage(StorageContext.from_defaults(persist_dir=str(tmp_path / "p")), llm=llm)
    with pytest.raises(ConfigError, match="llm="):
        load_index_from_storage(StorageContext.from_defaults(
            persist_dir=str(tmp_path / "p"), vector_store=sq.SqueezedKVStore.from_persist_dir(tmp_path / "p")))


def test_bad_arguments_raise_config_error(index):
    with pytest.raises(ConfigError):
        index.as_query_engine(keep=0.0)
    with pytest.raises(ConfigError):
        index.as_retriever(similarity_top_k=0)
    with pytest.raises(ConfigError):
        index.as_chat_engine(chat_mode="condense_question")
    too_long = index.as_chat_engine(max_new_tokens=10**6)
    with pytest.raises(ContextTooLongError):
        too_long.chat(QUESTION)
    assert too_long.chat_history == []  # a failed turn leaves no half-written history


def test_insert_and_delete_ref_doc_are_exact(index, llm):  # last: it changes the shared index
    store = index.vector_store
    before = store.corpus.input_ids.clone()
    extra = Document(text="The lighthouse keeper's cat is named Pepperoni.", id_="cat")
    index.insert(extra)
    assert "cat" in index.ref_doc_info and store.corpus.num_tokens > len(before)
    top = index.as_retriever(similarity_top_k=1).retrieve("What is the name of the lighthouse keeper's cat?")
    assert "Pepperoni" in top[0].node.get_content()
    index.delete_ref_doc("cat", delete_from_docstore=True)
    assert "cat" not in index.ref_doc_info and "cat" not in {n.ref_doc_id for n in store.nodes}
    assert torch.equal(store.corpus.input_ids, before)
    assert index.index_struct.node_ids == store.node_ids
