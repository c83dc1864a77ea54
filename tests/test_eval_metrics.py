"""Eval task files, metrics and the needle generator (CPU only, fast)."""

import json
import re
from pathlib import Path

import pytest

from sqattn_index.errors import EvalTaskError
from sqattn_index.eval.metrics import agreement, contains_accuracy, normalize_answer, qa_f1, summarize, token_f1
from sqattn_index.eval.needle import make_needle_tasks, write_tasks
from sqattn_index.eval.tasks import EvalTask, group_by_context, load_tasks

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------- metrics
@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("The Amber Vault!", "amber vault", id="article-punct-case"),
        pytest.param("  a  cat,  an apple\tand the\ndog. ", "cat apple and dog", id="whitespace"),
        pytest.param("Theory of another", "theory of another", id="article-only-whole-words"),
        pytest.param("4,821.", "4821", id="digits-punct"),
        pytest.param("", "", id="empty"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_qa_f1_cases():
    assert qa_f1("The Amber vault.", ["amber vault"]) == 1.0
    # pred tokens {code, is, 4821}, gold {4821}: p=1/3, r=1 -> f1=0.5
    assert qa_f1("the code is 4821", ["4821"]) == pytest.approx(0.5)
    # max over golds
    assert qa_f1("Lisbon", ["Porto", "lisbon!"]) == 1.0
    assert qa_f1("Lisbon Porto", ["Porto", "Oslo"]) == pytest.approx(2 / 3)
    # token counts matter (bag of words with multiplicity)
    assert token_f1("red red red", "red") == pytest.approx(0.5)
    assert qa_f1("", ["4821"]) == 0.0
    assert qa_f1("the", ["a"]) == 0.0  # both empty after normalisation
    assert qa_f1("anything", []) == 0.0
    assert qa_f1("Oslo", "oslo") == 1.0  # single string gold


def test_contains_accuracy_cases():
    assert contains_accuracy("The code is 4821.", ["4821"]) == 1.0
    assert contains_accuracy("It is run from LISBON", ["Porto", "lisbon"]) == 1.0
    assert contains_accuracy("It is run from Porto", ["Lisbon"]) == 0.0
    assert contains_accuracy("", ["4821"]) == 0.0
    assert contains_accuracy("anything", ["", "  "]) == 0.0  # blank golds never match
    assert contains_accuracy("locker 17", " 17 ") == 1.0


def test_agreement_cases():
    assert agreement("The code is 4821.", "the code is 4821") == 1.0
    assert agreement("", "") == 1.0
    assert agreement("code 4821", "code 1234") == pytest.approx(0.5)
    assert agreement("Lisbon", "Porto") == 0.0
    assert agreement("a b c", "c b a") == 1.0  # different order: token F1 is 1


def test_summarize():
    rows = [
        {"accuracy": 1.0, "qa_f1": 0.5, "correct": True, "gold_nll": None, "id": "x"},
        {"accuracy": 0.0, "qa_f1": 1.0, "correct": False, "gold_nll": 2.0, "id": "y"},
        {"accuracy": 1.0, "qa_f1": 0.0, "correct": True, "gold_nll": float("nan")},
    ]
    out = summarize(rows)
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["qa_f1"] == pytest.approx(0.5)
    assert out["correct"] == pytest.approx(2 / 3)
    assert out["gold_nll"] == pytest.approx(2.0)
    assert "id" not in out
    assert out["n"] == 3
    assert summarize([]) == {"n": 0}


# ---------------------------------------------------------------- loader
def _line(**over):
    obj = {"_id": "t1", "context": "ctx", "input": "q?", "answers": ["a"]}
    for k, v in over.items():
        if v is ...:
            obj.pop(k)
        else:
            obj[k] = v
    return json.dumps(obj)


def _write(tmp_path, lines, name="tasks.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_tasks_ok_with_blank_lines(tmp_path):
    path = _write(tmp_path, [_line(), "", "   ", _line(_id="t2", choices=["a", "b"], gold_choice=1)])
    tasks = load_tasks(path)
    assert [t.id for t in tasks] == ["t1", "t2"]
    assert tasks[0] == EvalTask(id="t1", context="ctx", input="q?", answers=["a"])
    assert tasks[1].choices == ["a", "b"] and tasks[1].gold_choice == 1
    assert load_tasks(str(path))[1].to_dict()["gold_choice"] == 1


@pytest.mark.parametrize(
    "bad, field, expect",
    [
        pytest.param('{"_id": "x", "context": ', "<line>", "invalid JSON", id="invalid-json"),
        pytest.param("[1, 2]", "<line>", "JSON object", id="not-object"),
        pytest.param(_line(_id=...), "_id", "missing", id="missing-id"),
        pytest.param(_line(_id=["x"]), "_id", "a string", id="id-type"),
        pytest.param(_line(context=...), "context", "missing", id="missing-context"),
        pytest.param(_line(context=""), "context", "non-empty", id="empty-context"),
        pytest.param(_line(input=3), "input", "got int", id="input-type"),
        pytest.param(_line(answers=...), "answers", "missing", id="missing-answers"),
        pytest.param(_line(answers="a"), "answers", "list of strings", id="answers-not-list"),
        pytest.param(_line(answers=[]), "answers", "empty list", id="answers-empty"),
        pytest.param(_line(answers=["a", 2]), "answers[1]", "got int", id="answers-item-type"),
        pytest.param(_line(answers=[" "]), "answers", "non-blank", id="answers-blank"),
        pytest.param(_line(choices="abc", gold_choice=0), "choices", "list of strings", id="choices-type"),
        pytest.param(_line(choices=["a", "b"], gold_choice=2), "gold_choice", "[0, 1]", id="gold-out-of-range"),
        pytest.param(_line(choices=["a", "b"], gold_choice=-1), "gold_choice", "got -1", id="gold-negative"),
        pytest.param(_line(choices=["a", "b"], gold_choice="0"), "gold_choice", "an int", id="gold-type"),
        pytest.param(_line(gold_choice=0), "gold_choice", "choices", id="gold-without-choices"),
    ],
)
def test_load_tasks_errors_name_file_line_field(tmp_path, bad, field, expect):
    path = _write(tmp_path, [_line(), "", bad])  # the bad task is on line 3
    with pytest.raises(EvalTaskError) as info:
        load_tasks(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "line 3" in msg
    assert repr(field) in msg
    assert expect in msg
    assert isinstance(info.value, ValueError)


def test_load_tasks_missing_and_empty_file(tmp_path):
    with pytest.raises(EvalTaskError, match="not found"):
        load_tasks(tmp_path / "nope.jsonl")
    with pytest.raises(EvalTaskError, match="empty"):
        load_tasks(_write(tmp_path, [""], "empty.jsonl"))


def test_group_by_context_first_seen_order():
    def t(i, ctx):
        return EvalTask(id=str(i), context=ctx, input="q", answers=["a"])

    tasks = [t(0, "B"), t(1, "A"), t(2, "B"), t(3, "C"), t(4, "A")]
    groups = group_by_context(tasks)
    assert [c for c, _ in groups] == ["B", "A", "C"]
    assert [[x.id for x in g] for _, g in groups] == [["0", "2"], ["1", "4"], ["3"]]


# ---------------------------------------------------------------- needle generator
@pytest.fixture(scope="module")
def needle_tasks():
    return make_needle_tasks()


def test_needle_determinism(needle_tasks):
    assert make_needle_tasks() == needle_tasks
    other = make_needle_tasks(seed=1)
    assert other != needle_tasks
    assert [t["context"] for t in other] != [t["context"] for t in needle_tasks]


def test_needle_shape_and_sizes(needle_tasks):
    assert len(needle_tasks) == 16
    groups = group_by_context(EvalTask(t["_id"], t["context"], t["input"], t["answers"]) for t in needle_tasks)
    assert len(groups) == 4 and all(len(g) == 4 for _, g in groups)
    sizes = [round(len(c.split()) * 1.3) for c, _ in groups]
    assert 1800 <= min(sizes) <= 2300 and 5700 <= max(sizes) <= 6500
    assert len({t["_id"] for t in needle_tasks}) == 16
    titles = {c.split("\n", 1)[0] for c, _ in groups}
    assert len(titles) == 4  # different genres / documents
    counted = make_needle_tasks(num_contexts=1, questions_per_context=2, target_tokens=(500, 500),
                                count_tokens=lambda s: len(s))  # 1 "token" per character
    assert 500 <= len(counted[0]["context"]) <= 1500


def _sentences(context):
    # split at line breaks and at sentence ends, but not after the titles Dr. / Prof.
    return [s for line in context.split("\n") for s in re.split(r"(?<!Dr\.)(?<!Prof\.)(?<=[.?!]) +", line) if s]


_NUMERIC_FACT = re.compile(
    r"The access code for the [A-Z]\w+ vault is \d{4}\."
    r"|(?:Dr|Prof)\. [A-Z]\w+ [A-Z]\w+ keeps the [a-z ]+ in locker \d{2}\."
    r"|The [A-Z]\w+ relay station broadcasts on \d{3}\.\d megahertz\."
)


def _check_task(task):
    ctx, answer = task["context"], task["answers"][0]
    needle = task["needle"]
    assert task["answers"] == [answer]
    # the answer occurs exactly once, inside the planted sentence, next to the asked entity
    assert ctx.count(answer) == 1
    assert ctx.count(needle["sentence"]) == 1
    assert answer in needle["sentence"] and needle["entity"] in needle["sentence"]
    assert needle["entity"] in task["input"] and ctx.count(needle["entity"]) == 1
    holder = [s for s in _sentences(ctx) if answer in s]
    assert len(holder) == 1 and needle["entity"] in holder[0]
    # choices: 4 distinct, gold exactly once at gold_choice, distractors planted with other entities
    choices, gold = task["choices"], task["gold_choice"]
    assert len(choices) == 4 and len(set(choices)) == 4
    assert choices.count(answer) == 1 and choices[gold] == answer
    for i, value in enumerate(choices):
        assert ctx.count(value) == 1
        if i != gold:
            (sentence,) = [s for s in _sentences(ctx) if value in s]
            assert needle["entity"] not in sentence
    # filler holds no digits: every sentence with a digit is a planted fact of a fixed form
    for sentence in _sentences(ctx):
        if re.search(r"\d", sentence):
            assert _NUMERIC_FACT.fullmatch(sentence), sentence


def test_needle_answers_and_choices(needle_tasks):
    for task in needle_tasks:
        _check_task(task)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_needle_other_settings(seed):
    tasks = make_needle_tasks(num_contexts=5, questions_per_context=7, target_tokens=(400, 900), seed=seed)
    assert len(tasks) == 35
    for task in tasks:
        _check_task(task)


def test_needle_bad_arguments():
    with pytest.raises(ValueError):
        make_needle_tasks(num_contexts=0)
    with pytest.raises(ValueError):
        make_needle_tasks(target_tokens=(500, 100))
    with pytest.raises(ValueError):
        make_needle_tasks(questions_per_context=21)


def test_write_tasks_roundtrip(tmp_path):
    tasks = make_needle_tasks(num_contexts=2, questions_per_context=2, target_tokens=(200, 300), seed=5)
    path = write_tasks(tmp_path / "sub" / "t.jsonl", tasks)
    loaded = load_tasks(path)
    assert [t.id for t in loaded] == [t["_id"] for t in tasks]
    assert [t.choices for t in loaded] == [t["choices"] for t in tasks]
    assert len(group_by_context(loaded)) == 2


# ---------------------------------------------------------------- committed data files
def test_committed_needle_files_load_and_match_generator():
    full = load_tasks(DATA / "needle_tasks.jsonl")
    assert len(full) == 16 and len(group_by_context(full)) == 4
    committed = [json.loads(line) for line in (DATA / "needle_tasks.jsonl").read_text(encoding="utf-8").splitlines()]
    assert committed == make_needle_tasks()  # regenerable from the defaults

    tiny = load_tasks(DATA / "needle_tiny.jsonl")
    assert len(tiny) == 4
    groups = group_by_context(tiny)
    assert len(groups) == 2 and all(len(g) == 2 for _, g in groups)
    assert all(len(c.split()) * 1.3 < 500 for c, _ in groups)
    for task in tiny:
        assert task.choices[task.gold_choice] == task.answers[0]
        assert task.context.count(task.answers[0]) == 1


# ---------------------------------------------------------------- demo corpus shipped with the package
def test_demo_corpus_and_questions():
    from importlib.resources import files

    data = files("sqattn_index") / "data"
    docs = {p.name: p.read_text(encoding="utf-8") for p in data.iterdir() if p.name.endswith(".md")}
    assert len(docs) == 3
    assert all(400 <= len(text.split()) <= 700 for text in docs.values())
    assert 1500 <= sum(len(text.split()) for text in docs.values()) * 1.3 <= 3000
    questions = json.loads((data / "demo_questions.json").read_text(encoding="utf-8"))
    assert 4 <= len(questions) <= 6
    for item in questions:
        assert set(item) == {"question", "answer", "source"}
        assert docs[item["source"]].count(item["answer"]) == 1, item
        others = [text for name, text in docs.items() if name != item["source"]]
        assert not any(item["answer"] in text for text in others), item
