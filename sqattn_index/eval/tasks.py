"""Evaluation task files: LongBench-compatible JSONL, one task a line.

Each line is a JSON object::

    {"_id": str, "context": str, "input": str, "answers": [str, ...],
     "choices": [str, ...],   # optional: multiple-choice options
     "gold_choice": int}      # optional, needs "choices": index of the right option

Items that share the same ``context`` share one index (see :func:`group_by_context`).
Blank lines are skipped; anything else that is not a valid task raises
:class:`~sqattn_index.errors.EvalTaskError` naming the file, the line, the field,
what was expected and what came.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import EvalTaskError

__all__ = ["EvalTask", "load_tasks", "parse_task", "group_by_context"]


@dataclass
class EvalTask:
    """One evaluation item: a question (``input``) over a long ``context`` with gold ``answers``."""

    id: str
    context: str
    input: str
    answers: list[str]
    choices: list[str] | None = None
    gold_choice: int | None = None

    def to_dict(self) -> dict:
        """The LongBench-format dict of this task (``choices``/``gold_choice`` only when set)."""
        out: dict[str, Any] = {"_id": self.id, "context": self.context, "input": self.input, "answers": list(self.answers)}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.gold_choice is not None:
            out["gold_choice"] = self.gold_choice
        return out


def _describe(value: Any) -> str:
    """A short description of what came: type and a clipped repr."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _fail(where: str, field: str, expected: str, got: str) -> EvalTaskError:
    return EvalTaskError(f"{where}: field {field!r}: expected {expected}, got {got}. Fix that line of the task file.")


def _check_str(obj: dict, field: str, where: str, *, allow_empty: bool = True) -> str:
    if field not in obj:
        raise _fail(where, field, "a string", "nothing (the field is missing)")
    value = obj[field]
    if not isinstance(value, str):
        raise _fail(where, field, "a string", _describe(value))
    if not allow_empty and not value.strip():
        raise _fail(where, field, "a non-empty string", "an empty string")
    return value


def _check_str_list(obj: dict, field: str, where: str) -> list[str]:
    value = obj[field]
    if not isinstance(value, list):
        raise _fail(where, field, "a list of strings", _describe(value))
    if not value:
        raise _fail(where, field, "a non-empty list of strings", "an empty list")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _fail(where, f"{field}[{i}]", "a string", _describe(item))
    return list(value)


def parse_task(obj: Any, where: str = "<task>") -> EvalTask:
    """Validate one decoded JSON object and turn it into an :class:`EvalTask`.

    ``where`` prefixes error messages (``load_tasks`` passes ``"FILE, line N"``).
    """
    if not isinstance(obj, dict):
        raise _fail(where, "<line>", "a JSON object", _describe(obj))
    task_id = obj.get("_id")
    if "_id" not in obj:
        raise _fail(where, "_id", "a string", "nothing (the field is missing)")
    if isinstance(task_id, int) and not isinstance(task_id, bool):
        task_id = str(task_id)  # numeric ids are common in hand-made files; accept them as text
    if not isinstance(task_id, str):
        raise _fail(where, "_id", "a string", _describe(task_id))
    context = _check_str(obj, "context", where, allow_empty=False)
    question = _check_str(obj, "input", where, allow_empty=False)
    if "answers" not in obj:
        raise _fail(where, "answers", "a non-empty list of strings", "nothing (the field is missing)")
    answers = _check_str_list(obj, "answers", where)
    if not any(a.strip() for a in answers):
        raise _fail(where, "answers", "at least one non-blank answer", _describe(answers))

    choices = None
    if obj.get("choices") is not None:
        choices = _check_str_list(obj, "choices", where)
    gold = obj.get("gold_choice")
    if gold is not None:
        if choices is None:
            raise _fail(where, "gold_choice", "to come with a 'choices' list", "gold_choice without choices")
        if not isinstance(gold, int) or isinstance(gold, bool):
            raise _fail(where, "gold_choice", "an int", _describe(gold))
        if not 0 <= gold < len(choices):
            raise _fail(where, "gold_choice", f"an int in [0, {len(choices) - 1}] (index into choices)", str(gold))
    return EvalTask(id=task_id, context=context, input=question, answers=answers, choices=choices, gold_choice=gold)


def load_tasks(path: str | os.PathLike) -> list[EvalTask]:
    """Read a LongBench-compatible JSONL file into a list of :class:`EvalTask`, in file order.

    Raises :class:`EvalTaskError` for a missing/unreadable file, invalid JSON, missing fields,
    wrong types, empty answers, or ``gold_choice`` out of range; the message names the file,
    the line number and the field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalTaskError(f"{path}: task file not found. Expected a JSONL file, one task a line.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalTaskError(f"{path}: cannot read the task file as UTF-8 text ({exc}).") from exc

    tasks: list[EvalTask] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(where, "<line>", "one JSON object per line", f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        tasks.append(parse_task(obj, where))
    if not tasks:
        raise EvalTaskError(f"{path}: expected at least one task, got an empty file.")
    return tasks


def group_by_context(tasks: Iterable[EvalTask]) -> list[tuple[str, list[EvalTask]]]:
    """Group tasks by identical ``context`` (one index per group), contexts in first-seen order,
    tasks inside a group in their original order."""
    groups: dict[str, list[EvalTask]] = {}
    for task in tasks:
        groups.setdefault(task.context, []).append(task)
    return list(groups.items())
