"""Each example script runs to completion offline (sockets blocked, HF_HUB_OFFLINE=1) on a small folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUESTION = "What is the access code for the Amber vault?"

# Run a script as __main__ after making every socket connection fail.
RUNNER = """
import runpy, socket, sys
def _blocked(*a, **k):
    raise OSError("network access is blocked in this test")
socket.socket.connect = _blocked
socket.create_connection = _blocked
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    def blocked(*args, **kwargs):
        raise OSError("network access is blocked in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket, "create_connection", blocked)


@pytest.fixture(scope="module")
def small_docs(tmp_path_factory, smol_dir):
    """Two short documents (about 150 tokens) with facts to ask about; smol_dir makes sure the model is cached."""
    folder = tmp_path_factory.mktemp("docs")
    (folder / "vault.md").write_text(
        "# The Amber vault\n\nThe Amber vault sits under the old customs house by the harbor. It was built in 1887 "
        "to keep the harbor master's ledgers dry during the winter floods. The access code for the Amber vault is "
        "4821. Only the harbor master and her deputy, Tomas Brell, know it.\n")
    (folder / "garden.txt").write_text(
        "The community garden has forty plots. Harriet Osei keeps the waiting list for plots, and new members are "
        "welcomed every spring at the seed swap. The old apple tree in the orchard is called Grandfather.\n")
    return folder


def run_example(name: str, *args: str, stdin: str | None = None) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(EXAMPLES / name), *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_chatbot_builds_then_reloads(small_docs, tmp_path):
    store = tmp_path / "store"
    commands = f"{QUESTION}\n/sources\n/keep 0.3\n/reset\n/keep nope\n/quit\n"
    out = run_example("chatbot.py", str(small_docs), "--store", str(store), "--max-new-tokens", "8",
                      "--device", "cpu", stdin=commands)
    assert "[encoded 2 document(s)" in out and f"> {QUESTION}" in out
    assert "[sources: vault.md" in out and "vault.md (lift" in out
    assert "[keep = 0.3]" in out and "[conversation cleared]" in out and "[usage: /keep" in out
    assert (store / "sqattn_kv" / "index.commit").is_file()
    out = run_example("chatbot.py", str(small_docs), "--store", str(store), "--max-new-tokens", "4",
                      "--device", "cpu", stdin="Who keeps the waiting list for plots?\n")  # ends at EOF
    assert "[loaded" in out and "0 document(s) updated" in out and "[sources:" in out


def test_llamaindex_pipeline(small_docs):
    out = run_example("llamaindex_pipeline.py", str(small_docs), "--question", QUESTION, "--max-new-tokens", "8",
                      "--device", "cpu")
    assert "2 document(s) -> 2 node(s)" in out
    assert "== SqueezedKVIndex.as_query_engine" in out and "== RetrieverQueryEngine" in out
    assert "source: vault.md" in out and "were never resolved" in out


def test_persist_and_reload(small_docs, tmp_path):
    out = run_example("persist_and_reload.py", str(small_docs), "--store", str(tmp_path / "storage"),
                      "--question", QUESTION, "--max-new-tokens", "8", "--device", "cpu")
    assert "same answer after reload: True" in out and "sqattn_kv" in out
