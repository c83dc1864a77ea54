"""Deterministic needle-in-a-haystack tasks (LongBench format, with 4 multiple-choice options).

Each context is long filler prose of one genre (staff handbook, travel log, lab notebook,
harbour log), composed from sentence templates, with planted facts of a fixed form, e.g.
``"The access code for the Amber vault is 4821."``. For every asked fact the context also holds
at least three distractor facts of the same form about other entities with other values; the
question's four ``choices`` are the true value and three of those distractor values.

Guarantees (checked when the context is built): every planted value and every entity phrase
occurs exactly once in its context, filler text holds no digits and none of the entity or value
words, so a value can only be found attached to its own entity.

All text is composed here; nothing external is read. Same arguments -> same tasks.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["make_needle_tasks", "write_tasks", "approx_tokens"]


def approx_tokens(text: str) -> int:
    """Default token estimate: words * 1.3 (close to the SmolLM2 tokenizer on English prose)."""
    return int(round(len(text.split()) * 1.3))


# ---------------------------------------------------------------- planted facts: entities and values
_VAULTS = "Amber Cobalt Saffron Juniper Obsidian Vermilion Marigold Pewter Russet Cinnabar Jasper Umber".split()
_FIRST = "Imani Tomas Ingrid Rafael Leona Oskar Priya Mateo Yara Emeric Noor Anselm Greta Kofi Sabine Dmitri".split()
_LAST = "Castell Reyes Halvorsen Achebe Lindqvist Moreau Okafor Brandt Sato Varga Quill Delacroix Farrow Nakamura".split()
_TITLES = ["Dr.", "Prof."]
_OBJECTS = ["blue notebook", "brass compass", "spare lab coat", "red toolbox", "field camera", "signed contract",
            "green ledger", "travel permit"]
_PROJECTS = "Northwind Lantern Bluebell Kingfisher Driftwood Halcyon Larkspur Thistle Meridian Wildrose Foxglove".split()
_CITIES = ["Tallinn", "Lisbon", "Hobart", "Quito", "Nagoya", "Windhoek", "Reykjavik", "Tbilisi", "Montevideo",
           "Halifax", "Bergen", "Cusco", "Marseille", "Adelaide", "Durban", "Krakow"]
_STATIONS = "Heron Osprey Plover Curlew Gannet Petrel Bittern Dunlin Merganser Shearwater".split()
_TERMINALS = "Granite Willow Sparrow Falcon Beacon Orchard Lattice Ember Glacier Mosaic".split()
_PW_HEAD = "tide fern moon salt rook ash copper hazel frost brine".split()
_PW_TAIL = "brass castle quarry wick marrow spindle lantern thorn gable kettle".split()


@dataclass
class _Fact:
    kind: str
    entity: str  # the phrase that names the entity, occurs once in the context
    value: str
    sentence: str
    question: str


def _distinct_numbers(rng: random.Random, make: Callable[[], str], taken: list[str], k: int) -> list[str]:
    """k new number strings, none a substring of another already taken (so each occurs once)."""
    out: list[str] = []
    while len(out) < k:
        v = make()
        if all(v not in t and t not in v for t in taken):
            taken.append(v)
            out.append(v)
    return out


def _make_facts(kind: str, n: int, rng: random.Random, taken_numbers: list[str]) -> list[_Fact]:
    """n facts of one kind with distinct entities and distinct values."""
    facts = []
    if kind == "code":
        values = _distinct_numbers(rng, lambda: str(rng.randint(1000, 9999)), taken_numbers, n)
        for e, v in zip(rng.sample(_VAULTS, n), values):
            facts.append(_Fact(kind, f"{e} vault", v, f"The access code for the {e} vault is {v}.",
                               f"What is the access code for the {e} vault?"))
    elif kind == "locker":
        values = _distinct_numbers(rng, lambda: str(rng.randint(10, 99)), taken_numbers, n)
        firsts, lasts, objs = rng.sample(_FIRST, n), rng.sample(_LAST, n), rng.sample(_OBJECTS, n)
        for f, l, o, v in zip(firsts, lasts, objs, values):
            t = rng.choice(_TITLES)
            facts.append(_Fact(kind, f"{f} {l}", v, f"{t} {f} {l} keeps the {o} in locker {v}.",
                               f"In which locker does {t} {f} {l} keep the {o}?"))
    elif kind == "city":
        for e, v in zip(rng.sample(_PROJECTS, n), rng.sample(_CITIES, n)):
            facts.append(_Fact(kind, f"{e} project", v, f"The {e} project is managed from the office in {v}.",
                               f"From which city is the {e} project managed?"))
    elif kind == "frequency":
        values = _distinct_numbers(rng, lambda: f"{rng.randint(100, 199)}.{rng.randint(1, 9)}", taken_numbers, n)
        for e, v in zip(rng.sample(_STATIONS, n), values):
            facts.append(_Fact(kind, f"{e} relay station", v, f"The {e} relay station broadcasts on {v} megahertz.",
                               f"On which frequency, in megahertz, does the {e} relay station broadcast?"))
    elif kind == "password":
        words = rng.sample([h + t for h in _PW_HEAD for t in _PW_TAIL], n)
        for e, v in zip(rng.sample(_TERMINALS, n), words):
            facts.append(_Fact(kind, f"{e} terminal", v, f"The password for the {e} terminal is {v}.",
                               f"What is the password for the {e} terminal?"))
    else:  # pragma: no cover - internal
        raise AssertionError(kind)
    return facts


_KINDS = ("code", "locker", "city", "frequency", "password")

# ---------------------------------------------------------------- filler prose, one vocabulary per genre
# Filler holds no digits and none of the entity/value words above.
_SHARED = {
    "weekday": "Monday Tuesday Wednesday Thursday Friday".split(),
    "name": ["Hollis", "Marguerite", "Bastian", "Wren", "Ottoline", "Cyrus", "Philippa", "Lorcan", "Elodie", "Barnaby"],
    "weather": ["grey and drizzly", "bright but windy", "unusually warm", "cold and still", "hazy"],
}
_GENRES = {
    "handbook": {
        "title": ["Staff Handbook of {org}", "{org}: Guide for New Employees"],
        "org": ["Corvane Logistics", "Pellmoor Textiles", "Briarwick Instruments", "Lowmarsh Freight Company"],
        "team": ["operations", "facilities", "payroll", "customer care", "dispatch", "security"],
        "topic": ["travel expenses", "holiday requests", "the dress code", "data handling", "shift swaps",
                  "safety training", "parking permits"],
        "room": ["long meeting room", "library corner", "quiet room", "glass office", "training suite"],
        "thing": ["printer", "door badge", "laptop charger", "coffee machine", "desk lamp"],
        "food": ["vegetable soup", "fish pie", "lentil curry", "roast chicken", "mushroom risotto"],
        "sentences": [
            "New staff members are asked to read the section on {topic} before the end of their first week.",
            "The {team} team meets every {weekday} morning in the {room} to review open questions.",
            "If a {thing} stops working, report it to the {team} desk instead of trying to repair it yourself.",
            "Visitors must sign the guest book at reception and wear a badge for the whole visit.",
            "Questions about {topic} can be sent to the {team} team, who usually answer within a day.",
            "The cafeteria serves {food} on {weekday}, and the full menu is posted beside the lifts.",
            "Please leave shared desks clear of papers and cups when you go home in the evening.",
            "Fire drills are held without warning, so learn the route to the nearest exit on your floor.",
            "The {room} can be booked for up to two hours through the internal calendar.",
            "Remote work is possible on most days, provided your team lead has agreed in advance.",
            "During the busy season the {team} team often stays late, and dinner is then provided.",
            "Everyone is encouraged to suggest improvements to {topic} at the quarterly review.",
            "{name} from the {team} team runs a short welcome session for newcomers every {weekday}.",
            "Our clients value punctuality above almost everything else, so plan your deliveries with care.",
            "Company phones must be returned to the {team} desk when you change roles or leave.",
            "A short survey about {topic} goes out twice a year, and the results are shared openly.",
            "The building opens early in the morning, but the heating only starts an hour later.",
            "Bicycles may be left in the covered rack behind the warehouse, never in the corridors.",
            "Managers are expected to hold a brief one-to-one meeting with each report every month.",
            "When in doubt about {topic}, ask before acting; nobody will mind a careful question.",
            "Lockers on the ground floor are cleaned every {weekday}, so take your belongings home the night before.",
            "The {team} team publishes a short newsletter with changes to {topic} and other news.",
            "Please switch off the {thing} in the {room} when you are the last to leave.",
            "Birthdays are celebrated with cake in the kitchen, usually on the nearest {weekday}.",
            "Parking near the loading bay is reserved for delivery vans between early morning and noon.",
            "Meetings in the {room} should start on time and end a few minutes early.",
            "If you feel unwell, tell your team lead before the start of your shift and rest at home.",
            "Training on {topic} is mandatory for everyone who handles customer orders.",
            "{name} keeps the list of first aiders, and it is pinned next to every kitchen door.",
            "Lost property is kept at reception until the end of the month and then given to charity.",
        ],
    },
    "travel": {
        "title": ["Travel Log: A Journey Through {org}", "Notes From the Road Across {org}"],
        "opener": ["Day {day}.", "Day {day}, {weekday}."],
        "org": ["the Kestrel Coast", "the Ossary Highlands", "the Vell River Valley", "the Saltgrass Plains"],
        "village": ["Brindlecombe", "Ashwater", "Tollbridge", "Little Harrow", "Fenmoor", "Cresswell", "Dunmere"],
        "landform": ["river", "ridge", "old canal", "coastal path", "limestone gorge", "pine forest"],
        "sight": ["a ruined watermill", "a chapel with a slate roof", "a flock of wild geese", "an abandoned lighthouse",
                  "terraced vineyards", "a stone bridge covered in ivy"],
        "food": ["smoked trout", "barley stew", "fresh goat cheese", "apple dumplings", "flatbread with herbs"],
        "goods": ["woollen scarves", "carved spoons", "jars of honey", "painted tiles", "baskets of plums"],
        "sentences": [
            "We left {village} shortly after dawn and followed the {landform} towards the east.",
            "The road to {village} was rutted and muddy, so the bus crawled along at walking pace.",
            "Our guide, {name}, pointed out {sight} and told us a long story about the old miller.",
            "In the evening we ate {food} at a small inn near the {landform}.",
            "The weather was {weather} for most of the afternoon, and we sheltered under a chestnut tree.",
            "I spent an hour sketching {sight} while the others wandered through the market.",
            "The market in {village} sold {goods}, and the prices were lower than we had expected.",
            "By nightfall we reached {village}, tired, sunburnt and very happy.",
            "An old woman at the station told us that the {landform} floods almost every spring.",
            "We missed the only ferry of the day and had to wait on the pier with a crowd of students.",
            "The innkeeper in {village} insisted that we try {food} before we went to bed.",
            "From the top of the {landform} we could see {sight} far below us.",
            "On {weekday} the whole village gathers in the square to trade {goods}.",
            "{name} lost a boot in the mud and walked the last stretch in borrowed sandals.",
            "The morning was {weather}, and the mist lay thick over the {landform}.",
            "We argued for an hour about the map before admitting that the shepherd had been right.",
            "A local band played in the square late into the night, and nobody seemed to sleep.",
            "The museum in {village} was closed, but the caretaker let us peek inside anyway.",
            "Every guesthouse on this route serves {food}, each one claiming the oldest recipe.",
            "I bought {goods} for my sister, although I have no idea how to fit them in my bag.",
            "The bells of the church in {village} woke us long before the alarm.",
            "{name} struck up a conversation with a fisherman who had never left the valley.",
            "We shared the compartment with a family carrying {goods} to their cousins.",
            "The path along the {landform} was steeper than the guidebook claimed, and we rested often.",
            "Dinner was {food} again, which nobody minded in the slightest.",
            "The sky cleared at sunset, and the hills turned the colour of copper for a few minutes.",
            "A dog followed us from {village} all the way to the next farm before turning back.",
            "We washed our socks in the sink and hung them from the window to dry.",
            "Somewhere near the {landform} we stopped to watch {sight}.",
            "The bus driver sang the whole way, and by the end half the passengers had joined in.",
        ],
    },
    "lab": {
        "title": ["Lab Notebook of the {org} Group", "{org} Group: Bench Notes"],
        "opener": ["Entry {day}.", "Entry {day}, {weekday}."],
        "org": ["Soil Microbiology", "Protein Folding", "Coastal Sediment", "Plant Genetics"],
        "assay": ["growth assay", "binding assay", "titration", "extraction", "staining run"],
        "reagent": ["buffer", "culture medium", "enzyme stock", "ethanol", "agar"],
        "instrument": ["spectrometer", "centrifuge", "plate reader", "microscope", "incubator"],
        "parameter": ["temperature", "shaking speed", "incubation time", "salt concentration"],
        "result": ["promising", "noisy", "consistent with last week", "hard to interpret", "surprisingly clean"],
        "sentences": [
            "Today I repeated the {assay} with a fresh batch of {reagent}.",
            "The {instrument} needed recalibration again, which delayed the morning run.",
            "{name} suggested lowering the {parameter} to reduce the noise in the readings.",
            "Samples were kept in the cold room overnight and checked first thing in the morning.",
            "The results of the {assay} look {result}, but we need more replicates.",
            "We ran out of {reagent} and borrowed some from the lab across the corridor.",
            "The weekly group meeting on {weekday} focused on the {assay} and its controls.",
            "I labelled every tube twice, because last month a whole rack was mixed up.",
            "The {instrument} made a grinding noise during the second run, so I logged a service request.",
            "{name} finished the literature review and circulated a summary to the group.",
            "Raising the {parameter} changed the outcome far less than we had predicted.",
            "The negative controls stayed clean, which is a relief after last week.",
            "I spent the afternoon cleaning the bench and restocking gloves and pipette tips.",
            "Our supervisor asked for a short written plan before we change the {assay} again.",
            "The {reagent} arrived late and slightly warm, so I set it aside for testing first.",
            "Data from the {instrument} were exported and backed up on the group drive.",
            "We agreed to keep the {parameter} fixed until the new {reagent} has been validated.",
            "{name} is away on {weekday}, so the {instrument} bookings move to the afternoon.",
            "The first plate was contaminated, most likely during the transfer step.",
            "A visiting student watched the {assay} and asked many sharp questions.",
            "The fume hood alarm went off twice for no obvious reason.",
            "I rewrote the protocol for the {assay} so that the washing steps are easier to follow.",
            "{name} found an error in the analysis script, and we reran the last three datasets.",
            "The {reagent} looked cloudy, so it went straight into the waste bottle.",
            "Results were {result}, and the plots are saved in the shared folder.",
            "We tried a shorter {parameter} ramp, with no clear effect on the yield.",
            "Cold room shelves were reorganised so that every group has its own labelled space.",
            "The {instrument} was booked by another group all morning, so I worked on the draft instead.",
            "{name} will present the {assay} at the department seminar on {weekday}.",
            "A reminder to myself: order more {reagent} before the holidays.",
        ],
    },
    "harbour": {
        "title": ["Harbourmaster's Log, Port of {org}", "Daily Log of the {org} Harbour Office"],
        "opener": ["Log, day {day}.", "Log, day {day}, {weekday}."],
        "org": ["Greyhaven", "Mallowby", "Saint Corran", "Westerly Sound"],
        "vessel": ["a fishing trawler", "the pilot boat", "a grain barge", "a small yacht", "the ferry",
                   "a rusty tug"],
        "cargo": ["timber", "salted fish", "crates of apples", "coal", "bales of wool", "roof slates"],
        "place": ["the north quay", "the breakwater", "the fuel dock", "the dry dock", "the outer mooring"],
        "sea": ["calm", "choppy", "rough with a long swell", "flat and glassy"],
        "sentences": [
            "{vessel} came in on the morning tide with a hold full of {cargo}.",
            "The sea was {sea}, and the weather stayed {weather} until noon.",
            "{name} reported a loose bollard at {place}, and the crew secured it before dark.",
            "Unloading of {cargo} at {place} took most of the afternoon.",
            "{vessel} asked for a berth at {place} but had to wait for the tide.",
            "The lighthouse keeper signalled fog in the channel shortly after sunset.",
            "Harbour dues for {vessel} were paid in full at the office on {weekday}.",
            "Gulls have again made a mess of the {cargo} stacked near the crane.",
            "Two divers inspected the hull of {vessel} and found nothing of concern.",
            "The night watch noted {vessel} leaving quietly without lights, and the coastguard was told.",
            "A new rope ladder was fitted at {place}, replacing the frayed one.",
            "By evening the wind had backed to the west and the sea was {sea}.",
            "{name} finished repainting the warning signs along {place}.",
            "Merchants complained that the price of {cargo} has risen again this season.",
            "The crane at {place} stalled twice, and a mechanic was called from town.",
            "Schoolchildren visited the office on {weekday} and asked about the old charts.",
            "Fishermen say the shoals are moving further out every year.",
            "The ferry ran late because the water beyond the breakwater was {sea}.",
            "{vessel} left for the islands at first light with passengers and mail.",
            "The harbour lamps along {place} were checked and two bulbs replaced.",
            "A seal spent the morning sleeping on the slipway, to the delight of the tourists.",
            "The tide was unusually low, and the old wreck showed above the mud for an hour.",
            "{name} logged the arrival of {vessel} and inspected its papers.",
            "Customs officers examined a shipment of {cargo} and let it through without delay.",
            "Rain fell steadily all afternoon, and work at {place} slowed to a crawl.",
            "The weather was {weather}, with good visibility across the bay.",
            "An anchor chain was found tangled around a mooring buoy near {place}.",
            "{vessel} reported engine trouble offshore, and the pilot boat went out to tow it in.",
        ],
    },
}


_WEEK = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen \
seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _number_words(n: int) -> str:
    """1 -> 'one', 42 -> 'forty-two', 105 -> 'one hundred five' (filler never holds digits)."""
    if n >= 100:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + (" " + _number_words(rest) if rest else "")
    if n < 20:
        return _ONES[n]
    return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")


def _fill(template: str, vocab: dict, rng: random.Random, **fixed: str) -> str:
    slots = {k: rng.choice(v) for k, v in vocab.items() if "{" + k + "}" in template and k not in fixed}
    text = template.format(**slots, **fixed)
    return text[0].upper() + text[1:]


def _paragraph(vocab: dict, rng: random.Random, recent: list[str], number: int) -> list[str]:
    """An optional opener ("Day twelve.") then 4-7 filler sentences; a template is not reused
    within the last 12 sentences."""
    out = []
    if "opener" in vocab:
        day = _WEEK[(vocab["first_day"] + number) % 7]  # entries follow the calendar
        out.append(_fill(rng.choice(vocab["opener"]), vocab, rng, day=_number_words(number), weekday=day))
    for _ in range(rng.randint(4, 7)):
        choices = [t for t in vocab["sentences"] if t not in recent[-12:]]
        template = rng.choice(choices)
        recent.append(template)
        out.append(_fill(template, vocab, rng))
    return out


def _build_context(genre: str, facts: list[_Fact], target: int, rng: random.Random,
                   count_tokens: Callable[[str], int]) -> str:
    vocab = {**_SHARED, **_GENRES[genre], "first_day": rng.randrange(7)}
    title = rng.choice(vocab["title"]).format(org=rng.choice(vocab["org"]))
    total = count_tokens(title) + sum(count_tokens(f.sentence) for f in facts)
    paragraphs: list[list[str]] = []
    recent: list[str] = []
    while total < target or len(paragraphs) < 2:
        para = _paragraph(vocab, rng, recent, len(paragraphs) + 1)
        total += count_tokens(" ".join(para))
        paragraphs.append(para)
    for fact in facts:  # scatter needles at random depths, at sentence boundaries
        para = rng.choice(paragraphs)
        first = 1 if "opener" in vocab else 0
        para.insert(rng.randint(first, len(para)), fact.sentence)
    return title + "\n\n" + "\n\n".join(" ".join(p) for p in paragraphs)


def _check_context(context: str, facts: list[_Fact]) -> None:
    for fact in facts:
        for needle in (fact.value, fact.entity, fact.sentence):
            assert context.count(needle) == 1, f"{needle!r} occurs {context.count(needle)} times"


def make_needle_tasks(num_contexts: int = 4, questions_per_context: int = 4,
                      target_tokens: tuple[int, int] = (2000, 6000), seed: int = 0,
                      count_tokens: Callable[[str], int] | None = None) -> list[dict]:
    """Generate needle tasks as LongBench-format dicts.

    Args:
        num_contexts: number of distinct contexts (each becomes one index in the eval).
        questions_per_context: questions asked over each context (at most 5 kinds x 4 per kind).
        target_tokens: (low, high) size of the contexts; sizes are spread evenly over the range.
        seed: everything is drawn from ``random.Random(seed)``.
        count_tokens: ``str -> int`` used to size the contexts; default :func:`approx_tokens`.

    Returns:
        ``[{"_id", "context", "input", "answers": [value], "choices": [4 values],
        "gold_choice": int, "needle": {"kind", "entity", "sentence"}}, ...]``, contexts in order,
        questions of one context next to each other. ``needle`` is extra metadata
        (ignored by :func:`~sqattn_index.eval.tasks.load_tasks`).
    """
    if num_contexts < 1 or questions_per_context < 1:
        raise ValueError(f"num_contexts and questions_per_context must be >= 1; got {num_contexts}, {questions_per_context}.")
    if questions_per_context > 4 * len(_KINDS):
        raise ValueError(f"questions_per_context must be <= {4 * len(_KINDS)}; got {questions_per_context}.")
    low, high = target_tokens
    if not 0 < low <= high:
        raise ValueError(f"target_tokens must be (low, high) with 0 < low <= high; got {target_tokens!r}.")
    count_tokens = count_tokens or approx_tokens
    rng = random.Random(seed)
    genres = list(_GENRES)
    rng.shuffle(genres)
    tasks: list[dict] = []
    for ci in range(num_contexts):
        target = low if num_contexts == 1 else round(low + (high - low) * ci / (num_contexts - 1))
        kinds = list(_KINDS)
        rng.shuffle(kinds)
        asked_kinds = [kinds[i % len(kinds)] for i in range(questions_per_context)]
        taken_numbers: list[str] = []
        facts: list[_Fact] = []
        asked: list[tuple[_Fact, list[_Fact]]] = []
        for kind in dict.fromkeys(asked_kinds):  # first-seen order
            n_asked = asked_kinds.count(kind)
            group = _make_facts(kind, min(n_asked + 3 + rng.randint(0, 2), 8), rng, taken_numbers)
            facts.extend(group)
            asked.extend((f, group) for f in group[:n_asked])
        rng.shuffle(facts)
        context = _build_context(genres[ci % len(genres)], facts, target, rng, count_tokens)
        _check_context(context, facts)
        for qi, (fact, group) in enumerate(asked):
            distractors = rng.sample([f.value for f in group if f is not fact], 3)
            gold = rng.randrange(4)
            choices = distractors[:gold] + [fact.value] + distractors[gold:]
            tasks.append({
                "_id": f"needle-s{seed}-c{ci}-q{qi}", "context": context, "input": fact.question,
                "answers": [fact.value], "choices": choices, "gold_choice": gold,
                "needle": {"kind": fact.kind, "entity": fact.entity, "sentence": fact.sentence},
            })
    return tasks


def write_tasks(path: str | os.PathLike, tasks: Iterable[dict]) -> Path:
    """Write task dicts as JSONL (one object a line, UTF-8, keys in insertion order); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for task in tasks:
            fh.write(json.dumps(task, ensure_ascii=False) + "\n")
    return path
