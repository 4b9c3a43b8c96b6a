"""Benchmark files -> `BenchItem`s: the project's `Example` plus the benchmark, a category and scoring hints.

    bench = load_benchmark("mathvista:data/MathVista/testmini.json")
    bench.name, bench.format, len(bench.items), bench.items[0].example.answer, bench.items[0].category

A `--data` spec is `[NAME=][FORMAT:]PATH`. Without `FORMAT:` the format is detected from the first record's
fields (below); `NAME=` renames the benchmark (default: the format's display name, or the file stem for JSONL).

Containers: a JSON list of records, a JSON object of records keyed by id (MathVista's `testmini.json`), or JSONL
(one record per line). Image paths are relative to the file's folder (or absolute), and every image is opened and
verified before any model is loaded, so a bad file fails in seconds, not an hour into a run.

Formats (required fields; [optional])
  mathvista   MathVista testmini. pid (or the object key), question, image, answer, question_type
              (multi_choice | free_form), answer_type (integer | float | text | list); [choices] (required when
              multi_choice), [precision], [unit], [metadata.task]. Multiple choice: the choices are listed in the
              prompt as (A) ... (B) ..., and the gold becomes the letter of the gold choice text, the project's
              convention (the verifier gets the choices too, so either the letter or the text counts). Free form:
              a short hint names the expected answer type (integer, a float with `precision` decimals, a list,
              the unit). Category: metadata.task (figure QA, geometry problem solving, ...).
  mathverse   MathVerse testmini. sample_index, question, image, answer, question_type, problem_version;
              [metadata]. Choices live inside the question ("Choices:\\nA:40°\\nB:60°"); they are read back out
              for the verifier when present. "Vision Only" items have an empty question: the prompt then asks to
              answer the question shown in the image. Category: problem_version (Text Dominant ... Vision Only).
  geometry3k  Geometry3K as exported by the common RL recipes: problem, answer, images. Ids are record
              numbers; the `<image>` placeholder is removed from the problem (the chat template places the image).
              One category, "all".
  jsonl       the project's own JSONL (`harmo_min.data.load_jsonl`, with its validation). Category: the task
              ("verifiable" / "open"); open items have no gold and are skipped in accuracy.
  synthetic   no file: `synthetic:N` or `synthetic:N:kind,kind` draws N built-in synthetic tasks
              (`harmo_min.synthetic.synthetic_examples`) with its own seed, so they are not the training draw.
              Category: the task kind.

Detection: `pid` or `answer_type` -> mathvista; `problem_version` -> mathverse; `id` -> jsonl; exactly
problem/answer/images -> geometry3k. Anything else is a `DataError` that names the file, lists the fields it has
and the fields each format expects.

Float golds need no rounding step: the verifier accepts a more precise prediction that rounds to the gold's
decimals, which is what MathVista's `precision` asks for.

Left out: parquet/arrow files and images embedded as bytes (export to JSON + image files first), MathVista's
official answer extraction by an LLM (the project's rule verifier decides, as in training), the original
Geometry3K folder layout (one data.json per problem folder).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from harmo_min.data import DataError, Example, load_jsonl

from harmo_min.synthetic import TASK_KINDS, synthetic_examples

BENCHMARK_FORMATS = ("mathvista", "mathverse", "geometry3k", "jsonl", "synthetic")
DISPLAY_NAMES = {"mathvista": "MathVista", "mathverse": "MathVerse", "geometry3k": "Geometry3K"}
EXPECTED_FIELDS = {
    "mathvista": "pid (or object key), question, image, answer, question_type, answer_type, "
                 "[choices, precision, unit, metadata]",
    "mathverse": "sample_index, question, image, answer, question_type, problem_version, [metadata]",
    "geometry3k": "problem, answer, images",
    "jsonl": "id, problem or messages, [images, answer, choices, task, constraints, reference]",
}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Seeds the synthetic benchmark; training's synthetic data uses the config seed (0 by default), so this draw is
# a different one. The tiny tasks have few distinct items, so "different draw" is not "unseen items".
SYNTHETIC_SEED = 1234


@dataclass
class BenchItem:
    example: Example
    benchmark: str
    category: str
    where: str                                   # "file:line" or "file[key]": named by errors and result rows
    meta: dict[str, Any] = field(default_factory=dict)  # format-specific extras kept for the results file


@dataclass
class Benchmark:
    name: str
    format: str
    path: str
    items: list[BenchItem]


def _expected(fmt: str) -> str:
    return f"expected {fmt} fields: {EXPECTED_FIELDS[fmt]}"


def parse_spec(spec: str) -> tuple[str | None, str | None, str]:
    """Split `[NAME=][FORMAT:]PATH` into (name, format, path); unknown prefixes stay part of the path."""
    name = None
    head, eq, rest = spec.partition("=")
    if eq and head and "/" not in head and ":" not in head:
        name, spec = head, rest
    fmt, colon, path = spec.partition(":")
    if colon and fmt in BENCHMARK_FORMATS:
        return name, fmt, path
    return name, None, spec


# ---------------------------------------------------------------------------------------------------- containers
def read_records(path: Path) -> list[tuple[str, str | None, dict]]:
    """(where, key, record) from a JSON list, a JSON object of records keyed by id (key set), or JSONL."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    records: list[tuple[str, str | None, Any]] = []
    data, as_json = None, path.suffix != ".jsonl"
    if as_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":
                raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
            as_json = False  # several top-level values: JSON Lines under a .json name (datasets' to_json does this)
    if as_json:
        if isinstance(data, list):
            records = [(f"{path}[{i}]", None, r) for i, r in enumerate(data)]
        elif isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
            records = [(f"{path}[{k!r}]", k, v) for k, v in data.items()]  # MathVista: {"1": {...}, ...}
        elif isinstance(data, dict):
            records = [(f"{path}:1", None, data)]  # JSON Lines with a single line
        else:
            raise DataError(f"{path}: expected a JSON list of records, an object of records keyed by id, or JSONL")
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", None, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    for where, _, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def detect_format(record: dict, where: str) -> str:
    keys = set(record)
    if "pid" in keys or "answer_type" in keys:
        return "mathvista"
    if "problem_version" in keys:
        return "mathverse"
    if "id" in keys:
        return "jsonl"
    if keys == {"problem", "answer", "images"}:
        return "geometry3k"
    formats = "; ".join(f"{f}: {EXPECTED_FIELDS[f]}" for f in EXPECTED_FIELDS)
    raise DataError(f"{where}: cannot tell the benchmark format from fields {sorted(keys)}. Expected fields by "
                    f"format: {formats}. Or name it: --data FORMAT:PATH with FORMAT one of {list(BENCHMARK_FORMATS)}")


# ---------------------------------------------------------------------------------------------------- field checks
def _field(record: dict, key: str, types: type | tuple[type, ...], where: str, fmt: str, *, optional: bool = False):
    if key not in record or record[key] is None:
        if optional:
            return None
        raise DataError(f"{where}: field '{key}': missing; {_expected(fmt)}")
    value = record[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise DataError(f"{where}: field '{key}': expected {names}, got {type(value).__name__}; {_expected(fmt)}")
    return value


def _image(value: Any, key: str, root: Path, where: str, check: bool) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: field '{key}': expected an image path (relative to the file), "
                        f"got {type(value).__name__}")
    path = Path(value) if os.path.isabs(value) else root / value
    if check:
        try:
            with Image.open(path) as im:
                im.verify()  # reads the whole file: a truncated image fails now, not mid-evaluation
        except FileNotFoundError:
            raise DataError(f"{where}: field '{key}': no such file {path}") from None
        except (OSError, SyntaxError, ValueError) as err:  # PIL's ways of saying "not an image I can read"
            raise DataError(f"{where}: field '{key}': unreadable image {path} ({err})") from None
    return str(path)


def _answer(record: dict, where: str, fmt: str) -> str:
    value = _field(record, "answer", (str, int, float, list), where, fmt)
    answer = json.dumps(value) if isinstance(value, list) else str(value)
    if not answer.strip():
        raise DataError(f"{where}: field 'answer': empty")
    return answer


def _numbered(choices: list[str]) -> str:
    return "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))


# ---------------------------------------------------------------------------------------------------- formats
def _float_hint(precision: Any) -> str:
    if isinstance(precision, (int, float)) and not isinstance(precision, bool) and precision >= 0:
        p = int(precision)
        return f"Answer with a number rounded to {p} decimal place{'s' if p != 1 else ''}."
    return "Answer with a decimal number."


_ANSWER_HINTS = {"integer": "Answer with an integer.", "list": "Answer with a Python list, e.g. [1, 2, 3]."}


def parse_mathvista(record: dict, where: str, key: str | None, root: Path, check_images: bool) -> BenchItem:
    f = "mathvista"
    pid = str(key if record.get("pid") is None and key is not None else _field(record, "pid", (str, int), where, f))
    question = _field(record, "question", str, where, f)
    image = _image(_field(record, "image", str, where, f), "image", root, where, check_images)
    qtype = _field(record, "question_type", str, where, f)
    atype = _field(record, "answer_type", str, where, f)
    precision = _field(record, "precision", (int, float), where, f, optional=True)
    unit = _field(record, "unit", str, where, f, optional=True)
    metadata = _field(record, "metadata", dict, where, f, optional=True) or {}
    if "answer" not in record or record["answer"] is None:
        raise DataError(f"{where}: field 'answer': missing (MathVista's test split has no public answers: use "
                        f"testmini); {_expected(f)}")
    answer = _answer(record, where, f)
    if qtype == "multi_choice":
        choices = _field(record, "choices", list, where, f)
        if not choices or len(choices) > len(LETTERS) or not all(isinstance(c, (str, int, float)) for c in choices):
            raise DataError(f"{where}: field 'choices': expected 1-26 strings, got {choices!r}")
        choices = [str(c) for c in choices]
        if answer not in choices:
            raise DataError(f"{where}: field 'answer': {answer!r} is not one of the choices {choices}")
        problem = f"{question}\nChoices:\n{_numbered(choices)}"
        gold = LETTERS[choices.index(answer)]
    elif qtype == "free_form":
        choices = None
        hint = _float_hint(precision) if atype == "float" else _ANSWER_HINTS.get(atype, "")
        if unit:
            hint = f"{hint} The unit is {unit}; give the number only.".strip()
        problem = f"{question}\n{hint}".strip()
        gold = answer
    else:
        raise DataError(f"{where}: field 'question_type': expected 'multi_choice' or 'free_form', got {qtype!r}")
    category = str(metadata.get("task") or metadata.get("category") or qtype)
    example = Example(id=pid, problem=problem, images=[image], answer=gold, choices=choices)
    meta = {"answer_type": atype, "precision": precision, "unit": unit, "answer_text": answer}
    return BenchItem(example, "", category, where, meta)


_INLINE_CHOICE = re.compile(r"^\s*\(?([A-Z])[:.)]\s*(.+?)\s*$")


def inline_choices(question: str) -> list[str] | None:
    """Options written after "Choices:" as `A:40°` lines (MathVerse's layout), or None if there are none."""
    head, sep, tail = question.rpartition("Choices:")
    if not sep:
        return None
    found = [_INLINE_CHOICE.match(line) for line in tail.strip().splitlines() if line.strip()]
    if not found or any(m is None for m in found):
        return None
    if [m.group(1) for m in found] != list(LETTERS[:len(found)]):
        return None  # not A, B, C, ... in order: better no choices than wrong ones
    return [m.group(2) for m in found]


def parse_mathverse(record: dict, where: str, key: str | None, root: Path, check_images: bool) -> BenchItem:
    f = "mathverse"
    sid = str(key if record.get("sample_index") is None and key is not None
              else _field(record, "sample_index", (str, int), where, f))
    question = record.get("question")
    if question is not None and not isinstance(question, str):
        raise DataError(f"{where}: field 'question': expected str, got {type(question).__name__}; {_expected(f)}")
    image = _image(_field(record, "image", str, where, f), "image", root, where, check_images)
    qtype = _field(record, "question_type", str, where, f)
    version = _field(record, "problem_version", str, where, f)
    metadata = _field(record, "metadata", dict, where, f, optional=True) or {}
    answer = _answer(record, where, f)
    if qtype not in ("multi-choice", "free-form"):
        raise DataError(f"{where}: field 'question_type': expected 'multi-choice' or 'free-form', got {qtype!r}")
    choices = inline_choices(question or "") if qtype == "multi-choice" else None
    problem = question.strip() if question and question.strip() else "Answer the question shown in the image."
    if qtype == "multi-choice" and not (question or "").strip():
        problem += " Give the letter of the correct option."
    example = Example(id=sid, problem=problem, images=[image], answer=answer, choices=choices)
    meta = {"question_type": qtype, "subject": metadata.get("subject"), "subfield": metadata.get("subfield")}
    return BenchItem(example, "", version, where, meta)


def parse_geometry3k(record: dict, where: str, key: str | None, root: Path, check_images: bool) -> BenchItem:
    f = "geometry3k"
    problem = _field(record, "problem", str, where, f)
    images = _field(record, "images", list, where, f)
    if not images:
        raise DataError(f"{where}: field 'images': empty; {_expected(f)}")
    paths = [_image(im, f"images[{i}]", root, where, check_images) for i, im in enumerate(images)]
    text = problem.replace("<image>", "").strip()
    if not text:
        raise DataError(f"{where}: field 'problem': empty once the <image> placeholder is removed")
    example = Example(id=key or "", problem=text, images=paths, answer=_answer(record, where, f))
    return BenchItem(example, "", "all", where)


# ---------------------------------------------------------------------------------------------------- entry point
PARSERS = {"mathvista": parse_mathvista, "mathverse": parse_mathverse, "geometry3k": parse_geometry3k}


def load_benchmark(spec: str, *, limit: int | None = None, check_images: bool = True,
                   synthetic_seed: int = SYNTHETIC_SEED) -> Benchmark:
    """Load every item of one `--data` spec (see the module docstring); the first `limit` items if given."""
    name, fmt, raw_path = parse_spec(spec)
    if fmt == "synthetic":
        return _synthetic(name, raw_path, limit, synthetic_seed)
    path = Path(raw_path).expanduser()
    if fmt != "jsonl":
        records = read_records(path)[:limit]
        fmt = fmt or detect_format(records[0][2], records[0][0])
    if fmt == "jsonl":
        if path.suffix != ".jsonl":
            raise DataError(f"{path}: looks like the project's own format, which is JSON Lines in a .jsonl file")
        bench_name = name or path.stem
        items = [BenchItem(ex, bench_name, ex.task or "verifiable", f"{path}[{ex.id!r}]")
                 for ex in load_jsonl(path, check_images=check_images)[:limit]]
        return Benchmark(bench_name, "jsonl", str(path), items)
    bench_name = name or DISPLAY_NAMES[fmt]
    items, seen = [], {}
    for index, (where, key, record) in enumerate(records):
        # Geometry3K records carry no id: their position is the id.
        key = key if key is not None or fmt != "geometry3k" else str(index)
        item = PARSERS[fmt](record, where, key, path.parent, check_images)
        item.benchmark = bench_name
        if item.example.id in seen:
            raise DataError(f"{where}: duplicate id {item.example.id!r} (first at {seen[item.example.id]})")
        seen[item.example.id] = where
        items.append(item)
    return Benchmark(bench_name, fmt, str(path), items)


def _synthetic(name: str | None, rest: str, limit: int | None, seed: int) -> Benchmark:
    count, _, kinds_text = rest.partition(":")
    if not count.isdigit() or int(count) < 1:
        raise DataError(f"synthetic:{rest}: expected synthetic:N or synthetic:N:kind,kind with N >= 1")
    kinds = tuple(k for k in kinds_text.split(",") if k) or TASK_KINDS
    unknown = [k for k in kinds if k not in TASK_KINDS]
    if unknown:
        raise DataError(f"synthetic:{rest}: unknown task kind(s) {unknown}; expected some of {list(TASK_KINDS)}")
    n = int(count) if limit is None else min(int(count), limit)
    examples = synthetic_examples(n, seed=seed, kinds=kinds)
    bench_name = name or "synthetic"
    # synthetic_examples cycles through `kinds`, so example i is of kind i % len(kinds).
    items = [BenchItem(ex, bench_name, kinds[i % len(kinds)], f"synthetic[{i}]") for i, ex in enumerate(examples)]
    return Benchmark(bench_name, "synthetic", f"synthetic:{rest}", items)


def load_benchmarks(specs: list[str], **kwargs) -> list[Benchmark]:
    """Load several specs; two benchmarks may not share a name (their rows would mix in the results)."""
    benches = [load_benchmark(s, **kwargs) for s in specs]
    names = [b.name for b in benches]
    for b in benches:
        if names.count(b.name) > 1:
            raise DataError(f"two --data give the benchmark name {b.name!r}; rename one: --data NAME=FORMAT:PATH")
    return benches
