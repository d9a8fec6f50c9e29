"""A synthetic instruction task whose answers have truly variable lengths.

Each sample is one of several string tasks over a small alphabet (copy, reverse, sort, dedupe,
repeat, add, spell, count); answers run from 1 to ~30 characters, so a model must learn
where to put EOS. Written as Alpaca jsonl (`instruction`, `input`, `output`), the pipeline's input.
One more task, `record`, asked for by name only, answers with a JSON object (JSON mode's test bed), and
`tool_chats` writes function-calling chats (tool_choice "auto"'s test bed: call the tool, or answer in text).

    dllm data synthetic --out data/ --train 20000 --heldout 200
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ALPHABET = "abcdefgh"
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def spell(n: int) -> str:
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("" if ones == 0 else " " + ONES[ones])


def _word(rng: random.Random, lo: int, hi: int, cap: int | None) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(lo, hi if cap is None else min(hi, cap))))


def _reverse(rng, cap):
    w = _word(rng, 1, 12, cap)
    return f"reverse {w}", w[::-1]


def _copy(rng, cap):
    w = _word(rng, 1, 14, cap)
    return f"copy {w}", w


def _sort(rng, cap):
    w = _word(rng, 1, 12, cap)
    return f"sort {w}", "".join(sorted(w))


def _dedupe(rng, cap):
    w = _word(rng, 1, 14, cap)
    return f"dedupe {w}", "".join(dict.fromkeys(w))


def _repeat(rng, cap):
    w, n = _word(rng, 1, 4, cap), rng.randint(1, 7)
    return f"repeat {w} {n}", " ".join([w] * n)


def _add(rng, cap):
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"add {a} {b}", str(a + b)


def _spell(rng, cap):
    n = rng.randint(0, 99)
    return f"spell {n}", spell(n)


def _count(rng, cap):
    w = _word(rng, 1, 20, cap)
    c = rng.choice(ALPHABET)
    return f"count {c} in {w}", str(w.count(c))


def _record(rng, cap):
    """One or two fields given in words, the same fields as a JSON object: {"name": "abc", "tags": ["a"]}."""
    fields = {"name": lambda: _word(rng, 1, 6, cap), "age": lambda: rng.randint(0, 99),
              "tags": lambda: [rng.choice(ALPHABET) for _ in range(rng.randint(0, 2))],
              "ok": lambda: rng.random() < 0.5}
    chosen = sorted(rng.sample(sorted(fields), rng.randint(1, 2)), key=list(fields).index)  # short: as the others
    record = {name: fields[name]() for name in chosen}
    words = {"name": str, "age": str, "tags": " ".join, "ok": lambda v: "yes" if v else "no"}
    prompt = "; ".join(f"{name} {words[name](value)}".rstrip() for name, value in record.items())
    return f"record {prompt}", json.dumps(record)


# The record task's answers as a JSON Schema (response_format json_schema): which fields a prompt gives is its own.
RECORD_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "ok": {"type": "boolean"}}}

TASKS = {"copy": _copy, "reverse": _reverse, "sort": _sort, "dedupe": _dedupe, "repeat": _repeat, "add": _add, "spell": _spell,
         "count": _count, "record": _record}
DEFAULT_TASKS = ["add", "copy", "count", "dedupe", "repeat", "reverse", "sort", "spell"]  # all but record


def make_samples(n: int, seed: int = 0, tasks: list[str] | None = None, max_word_len: int | None = None) -> list[dict]:
    """`n` Alpaca-style samples: instruction = the task line + ' = ', output = the answer.

    max_word_len caps the length of the letter strings the tasks work on (each task's own range
    otherwise, up to 12-20): shorter strings make an easier task with the same answer formats.
    """
    if max_word_len is not None and max_word_len < 1:
        raise ValueError(f"max_word_len must be >= 1 (or None for each task's own range), got {max_word_len}")
    rng = random.Random(seed)
    names = tasks or DEFAULT_TASKS
    unknown = set(names) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {sorted(unknown)}; choose from {sorted(TASKS)}")
    out = []
    for _ in range(n):
        name = rng.choice(names)
        prompt, answer = TASKS[name](rng, max_word_len)
        out.append({"instruction": prompt + " = ", "input": "", "output": answer, "task": name})
    return out


def write_dataset(out_dir: str | Path, n_train: int, n_heldout: int, seed: int = 0,
                  tasks: list[str] | None = None, max_word_len: int | None = None) -> tuple[Path, Path]:
    """Write train.jsonl and heldout.jsonl (held-out prompts never appear in train)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heldout = make_samples(n_heldout, seed=seed + 1, tasks=tasks, max_word_len=max_word_len)
    seen = {s["instruction"] for s in heldout}
    train, k = [], 0
    while len(train) < n_train:
        for s in make_samples(n_train, seed=seed + 1000 * (k + 2), tasks=tasks, max_word_len=max_word_len):
            if s["instruction"] not in seen and len(train) < n_train:
                train.append(s)
        k += 1
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        with open(out / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return out / "train.jsonl", out / "heldout.jsonl"


WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
NO_TOOL_ANSWER = "i cannot check that"
TOOL_CHAT_KINDS = ("call", "no_tool", "text")


def tool_chats(n: int, seed: int = 0, max_word_len: int | None = None) -> list[dict]:
    """`n` function-calling chats in OpenAI's shapes ({"tools", "messages", "kind"}), where the model must decide
    between a call and a text answer: "weather in <city>?" with the weather tool offered is a call of it with that
    city ("call"), without it the text NO_TOOL_ANSWER ("no_tool"); "reverse <word>", tool or not, the word reversed
    ("text"). The kinds in equal parts; cities and words are letter strings as the string tasks draw them."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.choice(TOOL_CHAT_KINDS)
        word = _word(rng, 2, 8, max_word_len)
        offered = kind == "call" or (kind == "text" and rng.random() < 0.5)
        if kind == "text":
            question, answer = f"reverse {word}", {"content": word[::-1]}
        else:
            question = f"weather in {word}?"
            answer = {"content": None, "tool_calls": [{"type": "function", "function": {
                "name": "weather", "arguments": json.dumps({"city": word})}}]} if kind == "call" else \
                {"content": NO_TOOL_ANSWER}
        out.append({"tools": [WEATHER_TOOL] if offered else [], "kind": kind,
                    "messages": [{"role": "user", "content": question}, {"role": "assistant", **answer}]})
    return out


def all_text(samples: list[dict]) -> list[str]:
    return [s["instruction"] + s["input"] + s["output"] for s in samples]


def add_synthetic_parser(sub) -> None:
    p = sub.add_parser("synthetic", help="write the synthetic variable-length task as Alpaca jsonl")
    p.add_argument("--out", required=True, help="output directory (train.jsonl, heldout.jsonl)")
    p.add_argument("--train", type=int, default=20000, help="training samples")
    p.add_argument("--heldout", type=int, default=200, help="held-out samples (prompts unseen in training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS),
                   help=f"tasks to draw from (default: {' '.join(DEFAULT_TASKS)}; record answers in JSON)")
    p.add_argument("--max-word-len", type=int, help="cap on the tasks' letter-string lengths (default: each task's own)")

    def run(args, rest) -> int:
        train, held = write_dataset(args.out, args.train, args.heldout, args.seed, args.tasks, args.max_word_len)
        print(f"wrote {args.train} samples to {train} and {args.heldout} to {held}")
        return 0

    p.set_defaults(func=run)
