"""Readers while a writer updates: in-process threads on one index, and reader processes on a persisted
directory that a writer persists over. Every answer / load must be exactly one version (tiny Llama, CPU)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from llama_index.core.schema import TextNode

import sqattn_index as sq

CONFIG = dict(keep_ladder=(0.5, 0.2), kmeans_iters=4)
KEEP = 0.5
TOKENS = 4
QUESTIONS = ["What is near the old town?", "Who walked past the river?", "Which chapter mentions the mill?",
             "What did the visitors talk about?"]
NEW_TEXT = "The lighthouse keeper's cat is named Pepperoni and sleeps by the lamp every night."
READERS, QUERIES = 8, 20
CHANGED = "The mill by the tower was rebuilt after the flood of the wet spring."  # new text of node n5


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return sq.SqueezedLLM.from_pretrained(tiny_llama_dir, device="cpu", dtype=torch.float32, max_new_tokens=TOKENS)


@pytest.fixture(scope="module")
def texts(filler):
    return filler(6)


def build(llm, texts, extra: list[str] = ()) -> sq.SqueezedKVIndex:
    """An index over ``texts`` (node ids n0..), then ``extra`` inserted one by one (ids x0..)."""
    nodes = [TextNode(id_=f"n{i}", text=t) for i, t in enumerate(texts)]
    index = sq.SqueezedKVIndex(nodes, llm=llm, config=sq.SqueezeConfig(**CONFIG))
    for i, t in enumerate(extra):
        index.insert_nodes([TextNode(id_=f"x{i}", text=t)])
    return index


def signature(response, text: str | None = None) -> tuple:
    """What a reply depends on: its text, ranked sources with scores, KV budget and per-node attention mass."""
    meta = response.metadata
    return (response.response if text is None else text,
            tuple(s.node.node_id for s in response.source_nodes), tuple(s.score for s in response.source_nodes),
            meta["kv_budget"], tuple(meta["node_mass"].items()))


def same(a: tuple, b: tuple) -> bool:
    def eq(x, y):
        if isinstance(x, float) and isinstance(y, float):
            return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
        if isinstance(x, tuple) and isinstance(y, tuple):
            return len(x) == len(y) and all(eq(i, j) for i, j in zip(x, y))
        return x == y
    return eq(a, b)


def ask(index, question: str, streaming: bool) -> tuple[int, tuple]:
    engine = index.as_query_engine(keep=KEEP, streaming=streaming, max_new_tokens=TOKENS)
    response = engine.query(question)
    if streaming:
        text = "".join(response.response_gen).strip()
        return response.metadata["index_version"], signature(response, text)
    return response.metadata["index_version"], signature(response)


def ranking(index, question: str) -> tuple:
    found = index.as_retriever(similarity_top_k=10).retrieve(question)
    return tuple(n.node.node_id for n in found), tuple(n.score for n in found)


def test_readers_see_one_version_while_a_writer_inserts(llm, texts):
    live = build(llm, texts)
    twin = build(llm, texts, [NEW_TEXT])  # what the live index becomes, computed beforehand
    v0 = live.vector_store.version
    expected = {}
    for q in QUESTIONS:
        for streaming in (False, True):
            expected[(streaming, v0, q)] = ask(live, q, streaming)[1]
            expected[(streaming, v0 + 1, q)] = ask(twin, q, streaming)[1]
    rankings = {v0: {q: ranking(live, q) for q in QUESTIONS}, v0 + 1: {q: ranking(twin, q) for q in QUESTIONS}}

    records, errors, done = [], [], []
    lock = threading.Lock()
    start = threading.Barrier(READERS + 2)

    def reader(tid: int) -> None:
        start.wait()
        for i in range(QUERIES):
            q = QUESTIONS[(tid + i) % len(QUESTIONS)]
            try:
                version, sig = ask(live, q, streaming=tid % 2 == 1)
            except Exception as exc:  # noqa: BLE001 - every failure is a test failure, reported below
                errors.append(f"reader {tid}: {type(exc).__name__}: {exc}")
                return
            with lock:
                records.append((tid % 2 == 1, version, q, sig))
                done.append(1)

    retrieved = []

    def retriever() -> None:
        start.wait()
        for i in range(QUERIES):
            try:
                retrieved.append((QUESTIONS[i % len(QUESTIONS)], ranking(live, QUESTIONS[i % len(QUESTIONS)])))
            except Exception as exc:  # noqa: BLE001
                errors.append(f"retriever: {type(exc).__name__}: {exc}")
                return

    threads = [threading.Thread(target=reader, args=(t,)) for t in range(READERS)]
    threads.append(threading.Thread(target=retriever))
    for t in threads:
        t.start()
    start.wait()
    while len(done) < 2 * READERS and not errors and any(t.is_alive() for t in threads):
        time.sleep(0.01)
    live.insert_nodes([TextNode(id_="x0", text=NEW_TEXT)])  # the writer, while the readers run
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert len(records) == READERS * QUERIES
    versions = {v for _, v, _, _ in records}
    assert versions == {v0, v0 + 1}, versions  # some questions ran before the insert, some after
    wrong = [(s, v, q) for s, v, q, sig in records if not same(sig, expected[(s, v, q)])]
    assert not wrong, wrong[:3]
    for q, got in retrieved:  # a retrieval is one whole version's ranking too
        assert any(same(got, rankings[v][q]) for v in (v0, v0 + 1)), (q, got)
    assert live.vector_store.version == v0 + 1
    assert live.vector_store.node_ids == twin.vector_store.node_ids == live.index_struct.node_ids
    assert torch.equal(live.vector_store.corpus.input_ids, twin.vector_store.corpus.input_ids)


def test_second_writer_in_process_is_serialized(llm, texts):
    index = build(llm, texts[:3])
    store = index.vector_store
    v0 = store.version
    start = threading.Barrier(2)
    errors = []

    def writer(i: int) -> None:
        start.wait()
        try:
            index.insert_nodes([TextNode(id_=f"w{i}",
                                         text=f"Writer {i} adds that the ferry leaves at {i + 7} o'clock.")])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert store.version == v0 + 2  # one swap each, the second applied on top of the first
    order = store.node_ids[3:]
    assert sorted(order) == ["w0", "w1"]
    texts_in_order = [f"Writer {int(i[1])} adds that the ferry leaves at {int(i[1]) + 7} o'clock." for i in order]
    twin = build(llm, texts[:3], texts_in_order)  # the same two inserts, one after the other
    assert torch.equal(store.corpus.input_ids, twin.vector_store.corpus.input_ids)
    assert store.spans == twin.vector_store.spans


READER = textwrap.dedent("""
    import json, os, sys, time, warnings
    import torch
    import sqattn_index as sq
    model, root, stop = sys.argv[1:4]
    llm = sq.SqueezedLLM.from_pretrained(model, device="cpu", dtype=torch.float32)
    print("ready", flush=True)
    rows, deadline, i = [], time.time() + 60, 0
    while not os.path.exists(stop) and time.time() < deadline:
        path = root if i % 2 == 0 else os.path.join(root, "sqattn_kv")  # LlamaIndex persist dir / bare KV dir
        i += 1
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                index = sq.load_index(path, llm=llm)
            store = index.vector_store
            docs_ok = all((index.docstore.get_node(n.node_id, raise_error=False) or n).get_content() == n.get_content()
                          for n in store.nodes)
            rows.append({"ids": store.node_ids, "struct": list(index.index_struct.node_ids),
                         "tokens": store.corpus.num_tokens, "n5": store.nodes[5].text, "docs_ok": docs_ok,
                         "warnings": [str(w.message) for w in caught if "sqattn" in str(w.message)
                                      or "KV index" in str(w.message)]})
        except Exception as exc:
            rows.append({"error": f"{type(exc).__name__}: {exc}"})
    print(json.dumps(rows), flush=True)
""")


def test_reader_processes_load_old_or_new_while_a_writer_persists(llm, texts, tiny_llama_dir, tmp_path):
    old = build(llm, texts)
    new = build(llm, texts[:-1] + [CHANGED], [NEW_TEXT])
    assert old.vector_store.nodes[-1].get_content() != new.vector_store.nodes[-2].get_content()  # same id n5
    expect = {tuple(ix.vector_store.node_ids): (ix.vector_store.corpus.num_tokens, ix.vector_store.nodes[5].text)
              for ix in (old, new)}
    root, stop = tmp_path / "index", tmp_path / "stop"
    old.storage_context.persist(str(root))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", READER, tiny_llama_dir, str(root), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
        time.sleep(0.3)
        for k in range(12):  # the writer: new, old, new, ... over the same directory
            (new if k % 2 == 0 else old).storage_context.persist(str(root))
        time.sleep(0.3)
    finally:
        stop.touch()
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        rows += json.loads(out.strip().splitlines()[-1])
    errors = [r["error"] for r in rows if "error" in r]
    assert not errors, errors[:3]
    assert len(rows) >= 10
    for r in rows:
        assert tuple(r["ids"]) in expect and (r["tokens"], r["n5"]) == expect[tuple(r["ids"])], r
        assert r["struct"] == r["ids"] and r["docs_ok"] and not r["warnings"], r
    final = sq.load_index(root, llm=llm)
    assert final.vector_store.node_ids == old.vector_store.node_ids  # the last persist was the old version


def test_load_index_reads_again_then_falls_back_when_parts_disagree(llm, texts, tmp_path, monkeypatch):
    """A docstore from another persist (as after a writer died between the parts): never mixed in."""
    old = build(llm, texts)
    new = build(llm, texts[:-1] + [CHANGED], [NEW_TEXT])
    a, b = tmp_path / "a", tmp_path / "b"
    old.storage_context.persist(str(a))
    new.storage_context.persist(str(b))
    assert sq.load_index(a, llm=llm).docstore.get_node("n5").get_content() == texts[-1]
    shutil.copy(b / "docstore.json", a / "docstore.json")
    monkeypatch.setattr(sys.modules["sqattn_index.index"], "_LOAD_ATTEMPTS", 2)
    with pytest.warns(UserWarning, match="do not match the KV index"):
        loaded = sq.load_index(a, llm=llm)
    assert loaded.vector_store.node_ids == old.vector_store.node_ids
    assert loaded.docstore.get_node("n5").get_content() == texts[-1]  # rebuilt from the KV index, not mixed
