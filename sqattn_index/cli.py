"""The ``sqattn`` command line: build, query, chat, info, eval, bench, demo.

Errors print one line (``sqattn: error: ...``) and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import SqattnError

__all__ = ["main"]


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
    if getattr(args, "flat", False):
        kwargs["hierarchical"] = False
    return SqueezeConfig(**kwargs)


def _llm(args):
    from .llm import SqueezedLLM

    return SqueezedLLM.from_pretrained(getattr(args, "model", None), device=getattr(args, "device", None),
                                       config=_config(args))


def cmd_eval(args) -> int:
    from .eval.runner import format_results, run_eval
    from .model_loading import load_local_model
    from .engine import SqueezedEngine

    engine = SqueezedEngine(load_local_model(args.model, device=args.device), _config(args))
    report = run_eval(args.tasks, args.keep, json_out=args.json, max_new_tokens=args.max_new_tokens, engine=engine,
                      progress=not args.quiet, items_out=args.items)
    print(format_results(report))
    return 0


def cmd_build(args) -> int:
    from .documents import read_documents
    from .index import SqueezedKVIndex

    docs = read_documents(args.docs)
    index = SqueezedKVIndex.from_documents(docs, llm=_llm(args), show_progress=not args.quiet)
    index.storage_context.persist(args.output)
    info = index.info() if hasattr(index, "info") else {}
    if args.json:
        print(json.dumps({"output": str(args.output), **info}, default=str))
    else:
        print(f"built index of {len(docs)} documents into {args.output}")
    return 0


def _load(args):
    from . import load_index

    return load_index(args.index, llm=_llm(args))


def _print_sources(response, limit: int = 3) -> None:
    for i, sn in enumerate(response.source_nodes[:limit]):
        text = sn.node.get_content().strip().replace("\n", " ")
        name = sn.node.metadata.get("file_name", sn.node.ref_doc_id or "")
        print(f"  [{i + 1}] {name} (attention {sn.score:.3f}): {text[:100]}...")


def cmd_query(args) -> int:
    index = _load(args)
    engine = index.as_query_engine(keep=args.keep, streaming=args.stream, max_new_tokens=args.max_new_tokens)
    response = engine.query(args.question)
    if args.stream:
        for delta in response.response_gen:
            print(delta, end="", flush=True)
        print()
        text = getattr(response, "response_txt", None) or ""
    else:
        text = str(response)
    meta = response.metadata or {}
    if args.json:
        print(json.dumps({"answer": text if not args.stream else text, "kv_budget": meta.get("kv_budget"),
                          "keep": args.keep, "seconds": meta.get("seconds"),
                          "sources": [{"node_id": s.node.node_id, "score": s.score} for s in response.source_nodes]},
                         default=str))
        return 0
    if not args.stream:
        print(text)
    print(f"-- kv_budget {meta.get('kv_budget', float('nan')):.3f} at keep {args.keep}; sources:")
    _print_sources(response)
    return 0


def cmd_chat(args) -> int:
    index = _load(args)
    chat = index.as_chat_engine(keep=args.keep, max_new_tokens=args.max_new_tokens)
    chat.chat_repl()
    return 0


def cmd_info(args) -> int:
    from .storage import load_index_records

    manifest, documents, nodes = load_index_records(args.index)
    root = Path(args.index)
    sizes = {p.name: p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    info = {
        "model": manifest.model_id, "tokens": manifest.num_tokens, "documents": len(documents), "nodes": len(nodes),
        "layers": manifest.num_layers, "kv_heads": manifest.num_kv_heads, "head_dim": manifest.head_dim,
        "dtype": manifest.dtype, "keep_ladder": list(manifest.keep_ladder),
        "clusters_per_level": manifest.extra.get("clusters", {}), "disk_bytes": sizes,
        "disk_bytes_total": sum(sizes.values()), "format_version": manifest.format_version,
        "build_seconds": manifest.extra.get("build_seconds"),
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for k, v in info.items():
            print(f"{k:>18}: {v}")
    return 0


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args.rest)


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(keep=args.keep, max_new_tokens=args.max_new_tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sqattn", description="Squeezed-attention KV-cache index over a fixed corpus.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", default=None, help="HF id, local folder or .gguf (default: embedded SmolLM2)")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
        sp.add_argument("--selection", choices=("threshold", "budget"), default=None)
        sp.add_argument("--backend", choices=("auto", "torch", "triton"), default=None)

    sp = sub.add_parser("build", help="build an index from files or folders")
    sp.add_argument("docs", nargs="+", help=".txt/.md/.pdf files or folders")
    sp.add_argument("-o", "--output", required=True, help="index directory to write")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--quiet", action="store_true")
    model_args(sp)
    sp.set_defaults(func=cmd_build)

    for name, func, help_ in (("query", cmd_query, "answer one question"), ("chat", cmd_chat, "chat REPL")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("index", help="index directory")
        if name == "query":
            sp.add_argument("question")
            sp.add_argument("--stream", action="store_true")
            sp.add_argument("--json", action="store_true")
        sp.add_argument("--keep", type=float, default=0.2, help="fraction of the fixed KV attended (1.0 = dense)")
        sp.add_argument("--max-new-tokens", type=int, default=128)
        model_args(sp)
        sp.set_defaults(func=func)

    sp = sub.add_parser("info", help="describe an index")
    sp.add_argument("index")
    sp.add_argument("--json", action="store_true")
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
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SqattnError, FileNotFoundError, PermissionError) as exc:
        if args.debug:
            raise
        print(f"sqattn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sqattn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
