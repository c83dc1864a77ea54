"""The eval runner behind ``sqattn eval``: per keep setting, answer every task over a squeezed index of its
context and report accuracy, QA-F1, likelihood-choice accuracy, gold NLL, agreement with dense, KV budget
and time (DESIGN §4)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..config import SqueezeConfig, check_keep
from ..engine import SqueezedEngine
from .metrics import agreement, contains_accuracy, qa_f1
from .tasks import EvalTask, group_by_context, load_tasks

__all__ = ["run_eval", "format_results"]


def _item_row(engine: SqueezedEngine, corpus, task: EvalTask, keep: float, max_new_tokens: int) -> dict:
    t0 = time.perf_counter()
    answer = engine.answer(corpus, task.input, keep=keep, max_new_tokens=max_new_tokens)
    row = {
        "id": task.id, "keep": keep, "prediction": answer.text,
        "accuracy": contains_accuracy(answer.text, task.answers), "qa_f1": qa_f1(answer.text, task.answers),
        "gold_nll": engine.score(corpus, task.input, task.answers[0], keep=keep).nll_per_token,
        "kv_budget": answer.kv_budget,
    }
    if task.choices is not None and task.gold_choice is not None:
        scores = [engine.score(corpus, task.input, choice, keep=keep).logprob_sum for choice in task.choices]
        row["choice_accuracy"] = float(max(range(len(scores)), key=scores.__getitem__) == task.gold_choice)
    row["seconds"] = time.perf_counter() - t0
    return row


def run_eval(tasks_path: str | Path, keeps: list[float], model: str | None = None, json_out: str | Path | None = None,
             max_new_tokens: int = 32, config: SqueezeConfig | None = None, engine: SqueezedEngine | None = None,
             progress: bool = True, items_out: str | Path | None = None) -> dict:
    """Evaluate the tasks of ``tasks_path`` at every keep in ``keeps``; returns {"results": [...]} (and writes it)."""
    keeps = [check_keep(k) for k in keeps]
    tasks = load_tasks(tasks_path)
    if engine is None:
        from ..model_loading import load_local_model

        engine = SqueezedEngine(load_local_model(model, progress=progress), config or SqueezeConfig())
    rows: list[dict] = []
    build_seconds = []
    for ci, (context, items) in enumerate(group_by_context(tasks)):
        corpus, _ = engine.build_corpus([context], progress=False)
        build_seconds.append({"tokens": corpus.num_tokens, **corpus.build_seconds})
        dense_pred = {}
        order = sorted(set(keeps) | {1.0}, reverse=True)  # dense first: agreement needs its predictions
        for keep in order:
            for task in items:
                row = _item_row(engine, corpus, task, keep, max_new_tokens)
                if keep == 1.0:
                    dense_pred[task.id] = row["prediction"]
                row["agreement"] = agreement(row["prediction"], dense_pred[task.id])
                row["in_request"] = keep in keeps
                rows.append(row)
                if progress:
                    print(f"[context {ci + 1}, {corpus.num_tokens} tok] keep={keep:<5} {task.id}: "
                          f"{row['prediction'][:60]!r} acc={row['accuracy']:.0f} budget={row['kv_budget']:.3f}",
                          file=sys.stderr)
        # Written after every context, so an interrupted run leaves the results of the contexts it finished.
        report = _report(rows, keeps, ci + 1)
        if json_out:
            Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
        if items_out:
            Path(items_out).write_text(json.dumps({"items": rows, "builds": build_seconds}, indent=2) + "\n")
    return _report(rows, keeps, len(build_seconds))


def _report(rows: list[dict], keeps: list[float], contexts: int) -> dict:
    results = []
    for keep in keeps:
        sel = [r for r in rows if r["keep"] == keep]
        out = {"keep": keep}
        for key in ("accuracy", "qa_f1", "choice_accuracy", "gold_nll", "agreement", "kv_budget"):
            vals = [r[key] for r in sel if key in r]
            if vals:
                out[key] = sum(vals) / len(vals)
        out["seconds"] = sum(r["seconds"] for r in sel)
        out["n"] = len(sel)
        results.append(out)
    return {"results": results, "contexts": contexts}


def format_results(report: dict) -> str:
    """A plain-text table of ``run_eval``'s results."""
    cols = ("keep", "accuracy", "qa_f1", "choice_accuracy", "gold_nll", "agreement", "kv_budget", "seconds", "n")
    lines = ["  ".join(f"{c:>15}" for c in cols)]
    for r in report["results"]:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{'-':>15}" if v is None else f"{v:>15.4f}" if isinstance(v, float) else f"{v:>15}")
        lines.append("  ".join(cells))
    return "\n".join(lines)
