"""The ``sqattn`` command line: build, query, chat, info, eval, bench, demo.

    sqattn build DOCS... -o DIR              encode files / folders once, persist the index into DIR
    sqattn info DIR [--json]                  model, tokens, documents, nodes, clusters, disk bytes per part
    sqattn query DIR "question" [--keep K] [--stream] [--json]
    sqattn chat DIR                           streaming REPL with history (reads stdin; /reset /sources /quit)
    sqattn eval TASKS.jsonl --keep 1.0,0.3,0.1 [--json OUT]
    sqattn bench ... | sqattn demo

``query`` and ``chat`` load the model the index was built with unless ``--model`` is given. Progress bars
(prefill, clustering, writing) go to stderr. Errors print one line, ``sqattn: error: ...``, and exit with
status 2 (1 for an unexpected internal error); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import SqattnError

__all__ = ["main", "build_parser"]


class _UsageError(Exception):
    """A command-line usage error (exit status 2, one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _keeps(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1.0,0.3,0.1; got {text!r}") from None


def _config(args):
    from .config import SqueezeConfig

    kwargs = {}
    if getattr(args, "selection", None):
        kwargs["selection"] = args.selection
    if getattr(args, "backend", None):
        kwargs["backend"] = args.backend
    if getattr(args, "centroid_precision", None):
        kwargs["centroid_precision"] = args.centroid_precision
    if getattr(args, "flat", False):
        kwargs["hierarchical"] = False
    return SqueezeConfig(**kwargs)


def _llm(args, model: str | None = None):
    from .llm import SqueezedLLM

    model = model if model is not None else getattr(args, "model", None)
    if model is not None and Path(model).exists():  # a local folder / .gguf: recorded absolute in the index
        model = str(Path(model).resolve())
    return SqueezedLLM.from_pretrained(model, device=getattr(args, "device", None), config=_config(args))


def _index_model(kv_dir: Path) -> str | None:
    """The model an index was built with, as ``load_local_model`` takes it (None = the embedded default)."""
    from .default_model import DEFAULT_MODEL_ID
    from .storage import load_index_records

    manifest, _, _ = load_index_records(kv_dir)
    return None if manifest.model_id == DEFAULT_MODEL_ID else manifest.model_id


def _err(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- build
def cmd_build(args) -> int:
    from .documents import read_documents
    from .index import SqueezedKVIndex
    from .index_info import describe_index
    from .vector_store import KV_DIRNAME

    t0 = time.perf_counter()
    docs = read_documents(args.docs)  # fails fast (no readable files) before the model loads
    llm = _llm(args)
    index = SqueezedKVIndex.from_documents(docs, llm=llm, show_progress=not args.quiet)
    out = Path(args.output)
    index.vector_store.persist_to(out / KV_DIRNAME, progress=not args.quiet)  # the long write, with a bar
    index.storage_context.persist(str(out))  # the JSON stores (the KV index above is not written twice)
    info = describe_index(out)
    info["wall_seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(info, default=str))
    else:
        print(f"built index of {info['documents']} documents ({info['nodes']} nodes, {info['tokens']} tokens) "
              f"into {out}: {info['disk_bytes_total'] / 2**20:.1f} MiB, {info['wall_seconds']:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------------- info
def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _span(values: list[int]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def cmd_info(args) -> int:
    from .index_info import describe_index

    info = describe_index(args.index)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    c = info["clusters"]
    rows = [
        ("index", info["path"]),
        ("model", info["model"]),
        ("tokens", info["tokens"]),
        ("documents", info["documents"]),
        ("nodes", info["nodes"]),
        ("layers x kv heads", f"{info['layers']} x {info['kv_heads']} (head dim {info['head_dim']}, {info['dtype']})"),
        ("clusters per head", f"fine {_span(c['fine_per_head'])}, coarse {_span(c['coarse_per_head'])} "
                              f"(all layers and heads: {c['fine_total']} fine, {c['coarse_total']} coarse)"),
        ("sinks / window", f"{info['sink_tokens']} / {info['window_tokens']} tokens"),
        ("keep ladder", ", ".join(f"{k:g}" for k in info["keep_ladder"])),
        ("build seconds", ", ".join(f"{k} {v:.1f}" for k, v in info["build_seconds"].items())
         + f" (total {info['build_seconds_total']:.1f})"),
        ("disk", f"{_human(info['disk_bytes_total'])} ({info['disk_bytes_total']} bytes)"),
    ]
    rows += [(f"  {part}", f"{_human(n):>10}  {n / max(info['tokens'], 1):10.1f} B/token")
             for part, n in info["disk_bytes"].items()]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


# --------------------------------------------------------------------------------------- query / chat
def _load(args):
    from .index import load_index
    from .vector_store import resolve_kv_dir

    kv = resolve_kv_dir(args.index)  # a missing or empty index fails before the model loads
    model = args.model if args.model is not None else _index_model(kv)
    return load_index(args.index, llm=_llm(args, model))


def _source_rows(response, limit: int | None = None) -> list[dict]:
    rows = []
    for sn in response.source_nodes[:limit]:
        node = sn.node
        rows.append({"node_id": node.node_id, "file_name": node.metadata.get("file_name", node.ref_doc_id or ""),
                     "score": sn.score, "text": " ".join(node.get_content().split())[:160]})
    return rows


def _print_sources(response, limit: int = 3) -> None:
    for i, row in enumerate(_source_rows(response, limit)):
        print(f"  [{i + 1}] {row['file_name']} (attention lift {row['score']:.2f}): {row['text'][:100]}...")


def cmd_query(args) -> int:
    index = _load(args)
    engine = index.as_query_engine(keep=args.keep, streaming=args.stream, max_new_tokens=args.max_new_tokens)
    response = engine.query(args.question)
    if args.stream:
        parts = []
        for delta in response.response_gen:
            parts.append(delta)
            if args.json:
                print(json.dumps({"delta": delta}), flush=True)
            else:
                print(delta, end="", flush=True)
        text = "".join(parts).strip()
        if not args.json:
            print()
    else:
        text = response.response or ""
    meta = response.metadata or {}
    if args.json:
        keys = ("kv_budget", "seconds", "prompt_tokens", "new_tokens", "finish_reason", "corpus_tokens")
        print(json.dumps({"answer": text, "keep": args.keep, **{k: meta.get(k) for k in keys},
                          "sources": _source_rows(response)}, default=str))
        return 0
    if not args.stream:
        print(text)
    budget = meta.get("kv_budget")
    seconds = (meta.get("seconds") or {}).get("total")
    print(f"-- keep {args.keep}: KV budget {budget if budget is None else f'{budget:.3f}'}"
          f"{'' if seconds is None else f', {seconds:.1f} s'}; sources:")
    _print_sources(response)
    return 0


def cmd_chat(args) -> int:
    index = _load(args)
    chat = index.as_chat_engine(keep=args.keep, max_new_tokens=args.max_new_tokens)
    interactive = sys.stdin.isatty()
    if interactive:
        _err(f"chat over {args.index} (keep {args.keep}); commands: /sources /reset /quit; Ctrl-D ends")
    last = None
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        message = line.strip()
        if not message:
            continue
        if message in ("/quit", "/exit"):
            break
        if message == "/reset":
            chat.reset()
            print("[conversation cleared]", flush=True)
            continue
        if message == "/sources":
            if last is None:
                print("(no answer yet)", flush=True)
            else:
                _print_sources(last)
            continue
        if not interactive:
            print(f"> {message}", flush=True)
        response = chat.stream_chat(message)
        for delta in response.response_gen:
            print(delta, end="", flush=True)
        print(flush=True)
        last = response
    return 0


# ------------------------------------------------------------------------------------ eval / bench / demo
def cmd_eval(args) -> int:
    from .engine import SqueezedEngine
    from .eval.runner import format_results, run_eval
    from .model_loading import load_local_model

    if not Path(args.tasks).is_file():
        raise FileNotFoundError(f"task file {args.tasks} does not exist; give a LongBench-format JSONL file.")
    engine = SqueezedEngine(load_local_model(args.model, device=args.device), _config(args))
    report = run_eval(args.tasks, args.keep, json_out=args.json, max_new_tokens=args.max_new_tokens, engine=engine,
                      progress=not args.quiet, items_out=args.items)
    print(format_results(report))
    return 0


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args.rest)


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(keep=args.keep, max_new_tokens=args.max_new_tokens, num_questions=args.questions, model=args.model)
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sqattn", description="Squeezed-attention KV-cache index over a fixed corpus.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(sp, default_help: str = "default: embedded SmolLM2"):
        sp.add_argument("--model", default=None, help=f"HF id, local folder or .gguf ({default_help})")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
        sp.add_argument("--selection", choices=("threshold", "budget"), default=None)
        sp.add_argument("--backend", choices=("auto", "torch", "triton"), default=None)
        sp.add_argument("--centroid-precision", choices=("model", "fp8"), default=None,
                        help="fp8: decode lookups score 8-bit centroid tables (default: model)")
        sp.add_argument("--debug", action="store_true", help="show tracebacks on errors")

    sp = sub.add_parser("build", help="build an index from files or folders")
    sp.add_argument("docs", nargs="+", help=".txt/.md/.rst/.pdf files or folders")
    sp.add_argument("-o", "--output", required=True, help="index directory to write (replaced atomically)")
    sp.add_argument("--json", action="store_true", help="print the index description as JSON")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    model_args(sp)
    sp.set_defaults(func=cmd_build)

    for name, func, help_ in (("query", cmd_query, "answer one question"),
                              ("chat", cmd_chat, "chat REPL over stdin (/sources /reset /quit)")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("index", help="index directory")
        if name == "query":
            sp.add_argument("question")
            sp.add_argument("--stream", action="store_true", help="print the answer as it is generated")
            sp.add_argument("--json", action="store_true",
                            help="print one JSON object (with --stream: a {\"delta\": ...} line per piece first)")
        sp.add_argument("--keep", type=float, default=0.2, help="fraction of the fixed KV attended (1.0 = dense)")
        sp.add_argument("--max-new-tokens", type=int, default=128)
        model_args(sp, "default: the model the index was built with")
        sp.set_defaults(func=func)

    sp = sub.add_parser("info", help="describe an index")
    sp.add_argument("index")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("eval", help="evaluate on a LongBench-format JSONL task file")
    sp.add_argument("tasks")
    sp.add_argument("--keep", type=_keeps, default=[1.0, 0.3, 0.1])
    sp.add_argument("--json", default=None, help="write {\"results\": [...]} here")
    sp.add_argument("--items", default=None, help="write per-item rows here")
    sp.add_argument("--max-new-tokens", type=int, default=32)
    sp.add_argument("--flat", action="store_true", help="flat (one-level) centroid lookup")
    sp.add_argument("--quiet", action="store_true")
    model_args(sp)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("bench", help="GPU benchmarks (see docs/bench)")
    sp.add_argument("rest", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("demo", help="build an index over the bundled sample documents and compare dense/squeezed")
    sp.add_argument("--keep", type=float, default=0.2)
    sp.add_argument("--max-new-tokens", type=int, default=40)
    sp.add_argument("--questions", type=int, default=4, help="how many sample questions")
    sp.add_argument("--model", default=None, help="HF id, local folder or .gguf (default: embedded SmolLM2)")
    sp.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sp.set_defaults(func=cmd_demo)
    return p


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        _err(f"sqattn: error: {_one_line(exc)}")
        return 2
    debug = debug or getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except (SqattnError, OSError, ValueError) as exc:  # user errors: missing files, bad index, bad values
        if debug:
            raise
        _err(f"sqattn: error: {_one_line(exc)}")
        return 2
    except KeyboardInterrupt:
        _err("sqattn: interrupted")
        return 130
    except Exception as exc:  # an internal error: still one line, the traceback on request
        if debug:
            raise
        _err(f"sqattn: error: internal error ({type(exc).__name__}: {_one_line(exc)}); "
             "run again with --debug for the traceback")
        return 1


if __name__ == "__main__":
    sys.exit(main())
