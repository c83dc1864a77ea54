"""Tests of sqattn_index.storage: round trip, refusals, corruption of every file, crashes, locks, readers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import sqattn_index.storage as st
from sqattn_index.config import SqueezeConfig
from sqattn_index.corpus_kv import CorpusKV, LayerKV
from sqattn_index.errors import (ConfigError, CorruptIndexError, IncompatibleModelError, IndexFormatError,
                                 IndexLockedError)
from sqattn_index.storage import store as store_module

NUM_LAYERS, HK, N, D, SINKS, WINDOW, CF, CC = 3, 2, 100, 8, 4, 8, 18, 6
LADDER = (0.5, 0.3, 0.1)


# ------------------------------------------------------------------------------------------------ helpers


def make_layer(gen: torch.Generator, dtype: torch.dtype) -> LayerKV:
    """A random but valid LayerKV: fine clusters of 4-6 keys, coarse clusters of 3 fine ones."""
    start, end = SINKS, N - WINDOW
    perms, fine_sizes = [], []
    for _ in range(HK):
        sizes = torch.full((CF,), 4, dtype=torch.int64)
        extra = (end - start) - 4 * CF
        while extra:
            j = int(torch.randint(CF, (1,), generator=gen))
            if sizes[j] < 6:
                sizes[j] += 1
                extra -= 1
        fine_sizes.append(sizes)
        middle = start + torch.randperm(end - start, generator=gen)
        perms.append(torch.cat([torch.arange(start), middle, torch.arange(end, N)]))
    fine_sizes = torch.stack(fine_sizes)  # [Hk, Cf]
    fine_offsets = torch.cat([torch.zeros(HK, 1, dtype=torch.int64), fine_sizes.cumsum(1)], 1) + start
    coarse_offsets = torch.arange(0, CF + 1, CF // CC).expand(HK, -1).contiguous()  # [Hk, Cc + 1]
    coarse_sizes = fine_sizes.view(HK, CC, CF // CC).sum(-1)  # [Hk, Cc]
    keys = torch.randn(HK, N, D, generator=gen).to(dtype)
    fine_centroids = torch.stack([torch.stack([keys[h, fine_offsets[h, j]:fine_offsets[h, j + 1]].float().mean(0)
                                               for j in range(CF)]) for h in range(HK)])
    return LayerKV(
        keys=keys, values=torch.randn(HK, N, D, generator=gen).to(dtype), perm=torch.stack(perms),
        fine_centroids=fine_centroids, fine_sizes=fine_sizes, fine_offsets=fine_offsets,
        coarse_centroids=torch.randn(HK, CC, D, generator=gen), coarse_sizes=coarse_sizes,
        coarse_offsets=coarse_offsets, sink_tokens=SINKS, window_tokens=WINDOW, keep_ladder=LADDER,
        thresholds=torch.rand(len(LADDER), HK, generator=gen),
        coarse_thresholds=torch.rand(len(LADDER), HK, generator=gen),
    )


def make_index(seed: int, dtype: torch.dtype = torch.bfloat16, tag: str | None = None):
    """(corpus, manifest, documents, nodes) of a small random index."""
    gen = torch.Generator().manual_seed(seed)
    layers = [make_layer(gen, dtype) for _ in range(NUM_LAYERS)]
    for layer in layers:
        layer.check()
    ids = torch.randint(0, 32000, (N,), generator=gen)
    corpus = CorpusKV(ids, layers, LADDER, {"prefill": 1.5, "clustering": 2.25 + seed, "calibration": 0.5})
    config = SqueezeConfig(sink_tokens=SINKS, window_tokens=WINDOW, keep_ladder=LADDER).to_dict()
    manifest = st.manifest_from_corpus(
        corpus, model_id="tiny/test-model", model_fingerprint=f"model-{seed % 2}", tokenizer_fingerprint="tok-1",
        config=config, layout={"template": "chatml", "prefix_tokens": 3},
        extra={"tag": tag or f"seed{seed}", "nested": {"a": [1, 2.5, None]}})
    docs = [st.DocumentRecord(f"doc-{i}", {"file_name": f"d{i}.txt", "ünïcode": "ж"}, f"{i:064x}",
                              30 * i, 30 * i + 30)
            for i in range(3)]
    nodes = [st.NodeRecord(f"node-{i}", f"doc-{i // 2}", f"text {i} ✓ {seed}", {"page": i}, 15 * i, 15 * i + 15, i)
             for i in range(6)]
    return corpus, manifest, docs, nodes


def assert_same(loaded, written_manifest, corpus, docs, nodes) -> None:
    """Every tensor and record of ``loaded`` equals what was written."""
    l_corpus, l_manifest, l_docs, l_nodes = loaded
    assert l_manifest == written_manifest
    assert l_docs == docs and l_nodes == nodes
    assert torch.equal(l_corpus.input_ids, corpus.input_ids)
    assert l_corpus.keep_ladder == corpus.keep_ladder and l_corpus.build_seconds == corpus.build_seconds
    assert l_corpus.num_layers == corpus.num_layers
    for got, want in zip(l_corpus.layers, corpus.layers):
        g, w = got.tensors(), want.tensors()
        assert sorted(g) == sorted(w)
        for name in w:
            assert g[name].dtype == w[name].dtype, name
            assert torch.equal(g[name], w[name]), name
        assert (got.sink_tokens, got.window_tokens, got.keep_ladder) == (SINKS, WINDOW, LADDER)


def persist(directory, index, **kwargs):
    corpus, manifest, docs, nodes = index
    return st.persist_index(directory, corpus, manifest, docs, nodes, **kwargs)


@pytest.fixture(scope="module")
def index_a():
    return make_index(1)


@pytest.fixture(scope="module")
def index_b():
    return make_index(2, dtype=torch.float16)


@pytest.fixture(scope="module")
def template(tmp_path_factory, index_a):
    """A persisted copy of index_a, plus the manifest persist returned."""
    directory = tmp_path_factory.mktemp("template") / "idx"
    return directory, persist(directory, index_a)


# ------------------------------------------------------------------------------------------ round trips


def test_cluster_spreads_round_trip_and_are_optional(tmp_path):
    corpus, manifest, docs, nodes = make_index(5)  # odd seed: model fingerprint "model-1"
    gen = torch.Generator().manual_seed(9)
    for layer in corpus.layers:
        layer.fine_spread = torch.rand(layer.fine_sizes.shape, generator=gen)
        layer.coarse_spread = torch.rand(layer.coarse_sizes.shape, generator=gen)
    written = persist(tmp_path / "idx", (corpus, manifest, docs, nodes))
    loaded = st.load_index_files(tmp_path / "idx", device="cpu", expected_model_fingerprint="model-1",
                                 expected_tokenizer_fingerprint="tok-1")
    assert_same(loaded, written, corpus, docs, nodes)
    # A stored config from before the spreads keeps the estimate its thresholds were calibrated with.
    old = {k: v for k, v in SqueezeConfig().to_dict().items() if k not in ("variance_term", "always_in_normaliser")}
    cfg = SqueezeConfig.from_dict(old)
    assert cfg.variance_term is False and cfg.always_in_normaliser is False
    assert SqueezeConfig.from_dict(SqueezeConfig().to_dict()).variance_term is True


def test_round_trip(tmp_path, index_a):
    corpus, manifest, docs, nodes = index_a
    written = persist(tmp_path / "idx", index_a, progress=True)
    assert written.format_version == st.FORMAT_VERSION
    assert written.extra["build_seconds"] == corpus.build_seconds and written.extra["tag"] == "seed1"
    assert written.keep_ladder == LADDER and written.dtype == "bfloat16"
    loaded = st.load_index_files(tmp_path / "idx", device="cpu", expected_model_fingerprint="model-1",
                                 expected_tokenizer_fingerprint="tok-1")
    assert_same(loaded, written, corpus, docs, nodes)
    assert SqueezeConfig.from_dict(loaded[1].config) == SqueezeConfig.from_dict(manifest.config)
    assert st.load_index_records(tmp_path / "idx") == (written, docs, nodes)
    expected_files = {"index.commit", "index.sqlite", "corpus.safetensors"} | {
        st.layer_file_name(i) for i in range(NUM_LAYERS)}
    assert set(os.listdir(tmp_path / "idx")) == expected_files
    assert sorted(os.listdir(tmp_path)) == [".idx.lock", ".idx.swap.lock", "idx"]  # no leftovers


def test_replace_and_class_api(tmp_path, index_a, index_b):
    store = st.KVStoreFiles(tmp_path / "idx")
    assert not store.exists()
    store.persist(*index_a)
    written_b = store.persist(*index_b)
    assert store.exists()
    assert_same(store.load(load_on_cpu=True), written_b, index_b[0], index_b[2], index_b[3])


def test_external_database(tmp_path, index_a, index_b):
    from sqlalchemy import create_engine, func, select

    from sqattn_index.storage.schema import IndexInfoRow, NodeRow

    url = f"sqlite:///{tmp_path / 'meta.sqlite'}"
    persist(tmp_path / "idx", index_a, db_url=url)
    written_b = persist(tmp_path / "idx", index_b, db_url=url)
    assert "index.sqlite" not in os.listdir(tmp_path / "idx")
    assert_same(st.load_index_files(tmp_path / "idx", db_url=url), written_b, index_b[0], index_b[2], index_b[3])
    engine = create_engine(url)
    with engine.connect() as conn:  # the old generation's rows are gone
        assert conn.execute(select(func.count()).select_from(IndexInfoRow)).scalar() == 1
        assert conn.execute(select(func.count()).select_from(NodeRow)).scalar() == len(index_b[3])
    engine.dispose()
    with pytest.raises(ConfigError, match="pass db_url"):
        st.load_index_files(tmp_path / "idx")


# -------------------------------------------------------------------------------------------- refusals


def test_format_version_mismatch_refused(tmp_path, index_a, monkeypatch):
    monkeypatch.setattr(store_module, "FORMAT_VERSION", 99)  # as if written by a future release
    persist(tmp_path / "idx", index_a)
    monkeypatch.undo()
    with pytest.raises(IndexFormatError, match=r"format version 99.*reads versions \[1\]"):
        st.load_index_files(tmp_path / "idx")


@pytest.mark.parametrize("kwargs, field", [
    pytest.param({"expected_model_fingerprint": "model-other"}, "model_fingerprint", id="model"),
    pytest.param({"expected_tokenizer_fingerprint": "tok-other"}, "tokenizer_fingerprint", id="tokenizer"),
])
def test_fingerprint_mismatch_refused(template, kwargs, field):
    directory, _ = template
    with pytest.raises(IncompatibleModelError) as err:
        st.load_index_files(directory, **kwargs)
    message = str(err.value)
    assert field in message and list(kwargs.values())[0] in message
    assert "rebuild the index with this model or load it with the model it was built with" in message.lower()
    with pytest.raises(IncompatibleModelError):
        st.load_index_records(directory, **kwargs)


def test_manifest_must_describe_corpus(tmp_path, index_a):
    corpus, manifest, docs, nodes = index_a
    bad = st.IndexManifest.from_dict({**manifest.to_dict(), "num_kv_heads": 4})
    with pytest.raises(ConfigError, match="num_kv_heads"):
        st.persist_index(tmp_path / "idx", corpus, bad, docs, nodes)
    with pytest.raises(ConfigError, match="unique"):
        st.persist_index(tmp_path / "idx", corpus, manifest, docs + docs[:1], nodes)
    assert not (tmp_path / "idx").exists()


def test_failed_persist_keeps_old_index(tmp_path, template, index_a, index_b, monkeypatch):
    directory = tmp_path / "idx"
    shutil.copytree(template[0], directory)
    real_write = store_module.write_tensor_file

    def failing_write(path, tensors):
        if path.name == st.layer_file_name(1):
            raise OSError(28, "No space left on device")
        return real_write(path, tensors)

    monkeypatch.setattr(store_module, "write_tensor_file", failing_write)
    with pytest.raises(OSError, match="No space left"):
        persist(directory, index_b)
    assert sorted(os.listdir(tmp_path)) == [".idx.lock", ".idx.swap.lock", "idx"]  # the new generation is gone
    assert_same(st.load_index_files(directory), template[1], index_a[0], index_a[2], index_a[3])


def test_reader_repair_before_first_swap(tmp_path, index_a, monkeypatch):
    """A reader that finds no target but a complete new generation rolls it forward; the writer copes."""
    directory = tmp_path / "idx"
    real_swap_in = store_module.swap_in
    early = []

    def reader_first(paths, uid):
        early.append(st.load_index_files(directory))  # repairs: renames .idx.new to idx
        assert directory.is_dir() and not paths.new.exists()
        real_swap_in(paths, uid)

    monkeypatch.setattr(store_module, "swap_in", reader_first)
    written = persist(directory, index_a)
    corpus, _, docs, nodes = index_a
    assert_same(early[0], written, corpus, docs, nodes)
    assert_same(st.load_index_files(directory), written, corpus, docs, nodes)
    assert sorted(os.listdir(tmp_path)) == [".idx.lock", ".idx.swap.lock", "idx"]


def test_foreign_directory_not_replaced(tmp_path, index_a):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a sqattn index"):
        persist(tmp_path / "idx", index_a)
    assert (tmp_path / "idx" / "notes.txt").read_text() == "mine"


def test_missing_index(tmp_path):
    with pytest.raises(CorruptIndexError, match="no sqattn index"):
        st.load_index_files(tmp_path / "nothing")


def test_no_pickle_in_storage():
    source = "".join(p.read_text() for p in Path(st.__file__).parent.glob("*.py"))
    assert not re.search(r"torch\.load\(|^\s*(import|from) (pickle|dill)", source, re.M)


# ---------------------------------------------------------------------------------------- corruption


PERSISTED_FILES = ["index.commit", "index.sqlite", "corpus.safetensors"] + [
    f"layer_{i:03d}.safetensors" for i in range(NUM_LAYERS)]


def _damage(path: Path, mode: str) -> None:
    data = path.read_bytes()
    if mode == "delete":
        path.unlink()
        return
    if mode.startswith("truncate"):
        path.write_bytes(data[: len(data) // 2] if mode == "truncate_half" else data[:-1])
        return
    at = {"bitflip_first": 0, "bitflip_middle": len(data) // 2, "bitflip_last": len(data) - 1}[mode]
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x04]) + data[at + 1:])


def test_parametrization_covers_every_file(template):
    assert sorted(os.listdir(template[0])) == sorted(PERSISTED_FILES)


@pytest.mark.parametrize("mode", ["truncate_half", "truncate_last_byte", "bitflip_first", "bitflip_middle",
                                  "bitflip_last", "delete"])
@pytest.mark.parametrize("file_name", PERSISTED_FILES)
def test_damaged_file_refused(tmp_path, template, file_name, mode):
    directory = tmp_path / "idx"
    shutil.copytree(template[0], directory)
    _damage(directory / file_name, mode)
    with pytest.raises((CorruptIndexError, IndexFormatError)) as err:
        st.load_index_files(directory)
    assert file_name in str(err.value) or isinstance(err.value, IndexFormatError)


# ------------------------------------------------------------------------------------------------ crashes


ZYGOTE = r"""
import os, sys, time, traceback
import sqattn_index.storage as st
indexes = {}
say = lambda line: os.write(1, (line + "\n").encode())  # one write a line: no interleaving with children
say("ZYGOTE")
for line in sys.stdin:
    cmd, crash_at, src, dst = line.rstrip("\n").split("\t")
    if cmd == "persist" and src not in indexes:
        indexes[src] = st.load_index_files(src)
    pid = os.fork()
    if pid == 0:  # the child process the test kills
        try:
            if crash_at != "-":
                os.environ["SQATTN_STORAGE_CRASH_AT"] = crash_at
            if cmd == "persist":
                say("READY")
                st.persist_index(dst, *indexes[src])
                say("DONE")
            else:
                with st.writer_lock(dst):
                    say("LOCKED")
                    time.sleep(30)
            time.sleep(30)
        except BaseException:
            traceback.print_exc()
            say("FAILED")
        finally:
            os._exit(1)
    say(f"PID {pid}")
    _, status = os.waitpid(pid, 0)
    say(f"REAPED {os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1}")
"""


class Zygote:
    """One interpreter with sqattn_index imported that forks the child processes of the crash tests
    (an interpreter start costs ~2 s of CPU; a fork a few ms). The test kills children with SIGKILL."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ZYGOTE"

    def run_and_kill(self, cmd: str, src: Path | str, dst: Path, wait_for: str, crash_at: str = "-",
                     delay: float = 0.0, while_alive=None) -> str:
        """Fork a child running ``cmd``; when it prints ``wait_for``, wait ``delay`` s, call ``while_alive()``
        if given, then SIGKILL the child. Returns the ``wait_for`` line."""
        self.proc.stdin.write(f"{cmd}\t{crash_at}\t{src}\t{dst}\n")
        self.proc.stdin.flush()
        pid, seen = None, None
        while pid is None or seen is None:
            line = self.proc.stdout.readline().strip()
            assert line and line != "FAILED", f"child failed before {wait_for!r} (see stderr)"
            if line.startswith("PID "):
                pid = int(line[4:])
            elif line.startswith(wait_for):
                seen = line
        time.sleep(delay)
        try:
            if while_alive is not None:
                while_alive()
        finally:
            os.kill(pid, signal.SIGKILL)
        while not (line := self.proc.stdout.readline().strip()).startswith("REAPED"):
            assert line, "zygote died"
        assert line == f"REAPED {int(signal.SIGKILL)}", line
        return seen

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


CRASH_POINTS = ["locked", "tmp_created", "layer_0_written", "layer_2_written", "db_written", "committed",
                "aside", "swapped"]
CRASH_DELAYS = [0.005, 0.03, 0.06, 0.09]
CRASH_CASES = [f"at_{p}" for p in CRASH_POINTS] + [f"after_{int(d * 1000)}ms" for d in CRASH_DELAYS]


@pytest.fixture(scope="module")
def new_src(tmp_path_factory, index_b):
    directory = tmp_path_factory.mktemp("new_src") / "idx"
    return directory, persist(directory, index_b)


@pytest.mark.parametrize("case", CRASH_CASES)
def test_sigkill_during_persist_leaves_loadable_index(tmp_path, zygote, case, template, new_src, index_a, index_b):
    target = tmp_path / "idx"
    shutil.copytree(template[0], target)
    if case.startswith("at_"):
        line = zygote.run_and_kill("persist", new_src[0], target, "CRASH_POINT", crash_at=case[3:])
        assert line == f"CRASH_POINT {case[3:]}"
    else:
        zygote.run_and_kill("persist", new_src[0], target, "READY", delay=int(case[6:-2]) / 1000)
    loaded = st.load_index_files(target)
    is_new = loaded[1].extra["tag"] == "seed2"
    if is_new:
        assert_same(loaded, new_src[1], index_b[0], index_b[2], index_b[3])
    else:
        assert_same(loaded, template[1], index_a[0], index_a[2], index_a[3])
    if case in ("at_locked", "at_tmp_created", "at_layer_0_written", "at_committed"):
        assert not is_new  # the new generation was not swapped in yet
    if case in ("at_aside", "at_swapped"):
        assert is_new  # a complete new generation is rolled forward
    assert target.is_dir()  # the reader repaired a crashed swap
    st.recover_index(target)
    assert sorted(os.listdir(tmp_path)) == [".idx.lock", ".idx.swap.lock", "idx"]
    persist(target, index_a)  # the lock died with the child: writing works again
    assert_same(st.load_index_files(target), template[1], index_a[0], index_a[2], index_a[3])


# ------------------------------------------------------------------------------------------ concurrency


def test_second_writer_locked(tmp_path, index_a, index_b):
    persist(tmp_path / "idx", index_a)
    with st.writer_lock(tmp_path / "idx"):
        with pytest.raises(IndexLockedError, match=r"index at .*idx is locked by another writer"):
            persist(tmp_path / "idx", index_b)
        assert st.load_index_files(tmp_path / "idx")[1].extra["tag"] == "seed1"  # readers never block
    persist(tmp_path / "idx", index_b)


def test_second_writer_process_locked(tmp_path, zygote):
    """The lock holds across processes, and is released when its holder dies."""
    directory = tmp_path / "idx"

    def second_writer():
        with pytest.raises(IndexLockedError, match="locked by another writer"):
            with st.writer_lock(directory):
                pass

    assert zygote.run_and_kill("lock", "-", directory, "LOCKED", while_alive=second_writer) == "LOCKED"
    with st.writer_lock(directory):  # released by the holder's death
        pass


def test_readers_see_whole_generations_while_writer_persists(tmp_path, index_a, index_b):
    directory = tmp_path / "idx"
    versions = {"seed1": (persist(directory, index_a), index_a), "seed2": (persist(tmp_path / "tmp_b", index_b),
                                                                           index_b)}
    done = threading.Event()
    errors, seen = [], []

    def reader():
        try:
            while not done.is_set() or not seen:
                loaded = st.load_index_files(directory)
                written, (corpus, _, docs, nodes) = versions[loaded[1].extra["tag"]]
                assert_same(loaded, written, corpus, docs, nodes)
                seen.append(loaded[1].extra["tag"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for i in range(8):
            persist(directory, index_b if i % 2 == 0 else index_a)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:3]
    assert len(seen) >= 8
