"""The ``sqattn`` command line end to end: build -> info -> query (JSON, streaming) -> chat, eval and demo on the
tiny Llama model (fast), one build + query with the default model, and the error cases (exit status 2, one
``sqattn: error:`` line, no traceback unless --debug)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from sqattn_index.cli import main
from sqattn_index.errors import CorruptIndexError

FACT = "The access code for the Amber vault is 4821."
QUESTION = "What is the access code for the Amber vault?"


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory, filler):
    d = tmp_path_factory.mktemp("docs")
    for i, text in enumerate(filler(4, FACT, at=2)):
        (d / f"doc{i}.md").write_text(text)
    (d / "notes.bin").write_bytes(b"\x00\x01")  # not a document: skipped in a folder
    return d


@pytest.fixture(scope="module")
def built(tiny_llama_dir, docs_dir, tmp_path_factory):
    """``sqattn build`` output on the tiny model: (index dir, parsed --json output)."""
    out = tmp_path_factory.mktemp("idx") / "index"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", stdout)
        mp.setattr(sys, "stderr", stderr)
        rc = main(["build", str(docs_dir), "-o", str(out), "--model", tiny_llama_dir, "--device", "cpu", "--json"])
    assert rc == 0, stderr.getvalue()[-2000:]
    assert "prefill" in stderr.getvalue() and "persist layers" in stderr.getvalue()  # progress bars on stderr
    return out, json.loads(stdout.getvalue().strip().splitlines()[-1])


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("sqattn: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_build_and_info(built, capsys, tiny_llama_dir):
    out, summary = built
    assert summary["documents"] == 5 and summary["nodes"] >= 5 and summary["tokens"] > 200
    assert (out / "sqattn_kv" / "index.commit").is_file() and (out / "docstore.json").is_file()
    rc, stdout, _ = run(capsys, "info", str(out), "--json")
    assert rc == 0
    info = json.loads(stdout)
    assert info["model"] == tiny_llama_dir and info["tokens"] == summary["tokens"]
    assert (info["documents"], info["nodes"]) == (summary["documents"], summary["nodes"])
    assert len(info["clusters"]["fine_per_head"]) == len(info["clusters"]["coarse_per_head"]) == info["layers"] == 2
    assert all(f > c > 0 for f, c in zip(info["clusters"]["fine_per_head"], info["clusters"]["coarse_per_head"]))
    assert info["keep_ladder"] and info["build_seconds"]["prefill"] > 0
    parts = info["disk_bytes"]
    for part in ("keys", "values", "centroids", "offsets", "permutation", "corpus_ids", "sqlite_metadata",
                 "llamaindex_json"):
        assert parts[part] > 0, part
    kv_bytes = 2 * info["layers"] * info["kv_heads"] * info["tokens"] * info["head_dim"] * 4  # float32 K and V
    assert parts["keys"] + parts["values"] == kv_bytes
    assert info["disk_bytes_total"] == sum(parts.values())
    rc, stdout, _ = run(capsys, "info", str(out))
    assert rc == 0 and "clusters per head" in stdout and "permutation" in stdout and "B/token" in stdout


def test_query_json_and_stream(built, capsys):
    out, summary = built
    rc, stdout, err = run(capsys, "query", str(out), QUESTION, "--json", "--keep", "0.3", "--max-new-tokens", "3",
                          "--device", "cpu")  # no --model: the model the index was built with
    assert rc == 0, err[-2000:]
    reply = json.loads(stdout.strip().splitlines()[-1])
    assert isinstance(reply["answer"], str) and reply["keep"] == 0.3 and 0 < reply["new_tokens"] <= 3
    assert 0 < reply["kv_budget"] <= 1.0 and reply["corpus_tokens"] == summary["tokens"]
    assert reply["sources"] and {"node_id", "file_name", "score", "text"} <= set(reply["sources"][0])
    rc, stdout, err = run(capsys, "query", str(out), QUESTION, "--stream", "--max-new-tokens", "3", "--device", "cpu")
    assert rc == 0, err[-2000:]
    assert "-- keep 0.2: KV budget" in stdout and "attention lift" in stdout
    rc, stdout, _ = run(capsys, "query", str(out), QUESTION, "--stream", "--json", "--max-new-tokens", "3",
                        "--keep", "0.3", "--device", "cpu")
    lines = [json.loads(line) for line in stdout.strip().splitlines()]
    assert rc == 0 and all(set(line) == {"delta"} for line in lines[:-1])
    assert lines[-1]["answer"] == "".join(line["delta"] for line in lines[:-1]).strip() == reply["answer"]


def test_chat_reads_stdin_with_history(built, capsys, monkeypatch):
    out, _ = built
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n/sources\nAnd again?\n/reset\n\n/quit\nignored\n"))
    rc, stdout, err = run(capsys, "chat", str(out), "--max-new-tokens", "2", "--device", "cpu")
    assert rc == 0, err[-2000:]
    assert f"> {QUESTION}" in stdout and "> And again?" in stdout and "attention lift" in stdout
    assert "[conversation cleared]" in stdout and "ignored" not in stdout


def test_eval_and_demo(tiny_llama_dir, tmp_path, capsys, filler):
    context = "\n\n".join(filler(3, FACT, at=1))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"_id": f"q{i}", "context": context, "input": q, "answers": ["4821"]}) + "\n"
                             for i, q in enumerate([QUESTION, "Which code opens the Amber vault?"])))
    rc, stdout, err = run(capsys, "eval", str(tasks), "--keep", "1.0,0.5", "--model", tiny_llama_dir, "--device",
                          "cpu", "--max-new-tokens", "2", "--json", str(tmp_path / "r.json"), "--quiet")
    assert rc == 0, err[-2000:]
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["keep"] for r in results] == [1.0, 0.5] and all(r["n"] == 2 for r in results)
    rc, stdout, err = run(capsys, "demo", "--model", tiny_llama_dir, "--questions", "1", "--max-new-tokens", "2")
    assert rc == 0, err[-2000:]
    assert "indexed 3 documents" in stdout and "mean KV budget" in stdout


def test_errors_are_one_line(built, capsys, tmp_path, tiny_llama_dir):
    out, _ = built
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.bin").write_bytes(b"\x00")
    cases = [
        (["build", str(empty), "-o", str(tmp_path / "x"), "--model", tiny_llama_dir], "no readable documents"),
        (["build", str(tmp_path / "nope"), "-o", str(tmp_path / "x")], "does not exist"),
        (["info", str(tmp_path / "missing")], "does not exist"),
        (["query", str(tmp_path / "missing"), "q"], "does not exist"),
        (["info", str(empty)], "no sqattn KV index"),
        (["query", str(out)], "the following arguments are required: question"),
        (["query", str(out), "q", "--keep", "abc"], "invalid float value"),
        (["query", str(out), "q", "--keep", "0"], "keep"),
    ]
    for argv, expected in cases:
        rc, _, err = run(capsys, *argv)
        assert rc == 2, (argv, err)
        assert expected in one_error_line(err), (argv, err)
    # a question longer than the model's context window (the tiny model has 4096 positions)
    rc, stdout, err = run(capsys, "query", str(out), "word " * 5000, "--device", "cpu")
    assert rc == 2 and "exceeds the model's 4096 positions" in one_error_line(err) and not stdout
    # corrupt index files: the commit marker, then a layer file
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    commit = bad / "sqattn_kv" / "index.commit"
    commit.write_bytes(commit.read_bytes()[:-5])
    rc, _, err = run(capsys, "info", str(bad))
    assert rc == 2 and "index.commit is corrupt" in one_error_line(err)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    layer = bad / "sqattn_kv" / "layer_001.safetensors"
    layer.write_bytes(layer.read_bytes()[:-64])
    rc, _, err = run(capsys, "query", str(bad), QUESTION, "--device", "cpu")
    assert rc == 2 and "layer_001.safetensors" in one_error_line(err)
    with pytest.raises(CorruptIndexError):  # --debug: the exception (and its traceback) instead
        main(["--debug", "info", str(tmp_path / "missing")])
    with pytest.raises(CorruptIndexError):
        main(["info", str(tmp_path / "missing"), "--debug"])


@pytest.mark.slow
def test_default_model_build_and_query_as_console_script(tmp_path):
    """The installed ``sqattn`` script with the embedded SmolLM2: build, query --json, and one error."""
    sqattn = shutil.which("sqattn") or pytest.skip("the sqattn console script is not on PATH")
    (tmp_path / "vault.md").write_text("The vault logbook. " + FACT + " Nobody else knows the code.")
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    def cli(*argv: str):
        return subprocess.run([sqattn, *argv], capture_output=True, text=True, env=env, timeout=300)

    build = cli("build", str(tmp_path / "vault.md"), "-o", str(tmp_path / "idx"), "--quiet", "--device", "cpu")
    assert build.returncode == 0, build.stderr[-2000:]
    assert "built index of 1 documents" in build.stdout
    query = cli("query", str(tmp_path / "idx"), QUESTION, "--json", "--keep", "0.5", "--max-new-tokens", "4",
                "--device", "cpu")  # no --model: the index's (default) model
    assert query.returncode == 0, query.stderr[-2000:]
    reply = json.loads(query.stdout.strip().splitlines()[-1])
    assert reply["answer"].strip() and reply["new_tokens"] <= 4 and reply["sources"][0]["file_name"] == "vault.md"
    missing = cli("info", str(tmp_path / "missing"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert missing.stderr.startswith("sqattn: error:") and "Traceback" not in missing.stderr
