"""The benchmark files evaluate.py reads -> `BenchItem`s: an `Example` plus the benchmark, a category, scoring hints.

Evaluation tooling beside evaluate.py, as nanochat keeps its tasks beside its package: the library (`harmo_min/`)
holds what training needs.

    bench = load_benchmark("mathvista:data/MathVista/testmini.json")
    bench.name, bench.format, len(bench.items), bench.items[0].example.answer, bench.items[0].category

A `--data` spec is `[NAME=][FORMAT:]PATH`. Without `FORMAT:` the format is detected from the first record's
fields (below); `NAME=` renames the benchmark (default: the format's display name; for JSONL the file stem; for
a `dataset` table the dataset's folder, `mmk12/data/test-*.parquet` -> mmk12).

Containers: a JSON list of records, a JSON object of records keyed by id (MathVista's `testmini.json`), JSONL
(one record per line), or a table as the hub ships it: a parquet file, a folder of parquet shards or a glob, an
arrow file, a `datasets.save_to_disk` folder (`harmo_min.data.table_files`; needs pyarrow, the `data` extra). An
image is a path relative to the file's folder (or absolute), encoded bytes, or a `{bytes, path}` struct. Every
image is decoded before any model is loaded (`harmo_min.data.ImageCheck`), so a bad file fails in seconds, not an
hour into a run; images over `max_image_pixels` are downscaled once at load, as in training.

Formats (required fields; [optional])
  mathvista   MathVista testmini. pid (or the object key), question, image, answer, question_type
              (multi_choice | free_form), answer_type (integer | float | text | list); [choices] (required when
              multi_choice), [precision], [unit], [metadata.task], [decoded_image] (the hub's parquet embeds
              the picture there, and `image` is then a path that does not exist locally: decoded_image wins).
              Multiple choice: the choices are listed in the prompt as (A) ... (B) ..., and the gold becomes the
              letter of the gold choice text, the project's convention (the verifier gets the choices too, so
              either the letter or the text counts). Free form: a short hint names the expected answer type
              (integer, a float with `precision` decimals, a list, the unit). Category: metadata.task (figure
              QA, geometry problem solving, ...).
  mathverse   MathVerse testmini. sample_index, question, image, answer, question_type, problem_version;
              [metadata]. Choices live inside the question ("Choices:\\nA:40°\\nB:60°"); they are read back out
              for the verifier when present. "Vision Only" items have an empty question: the prompt then asks to
              answer the question shown in the image. Category: problem_version (Text Dominant ... Vision Only).
  geometry3k  Geometry3K as exported by the common RL recipes: problem, answer, images. Ids are record
              numbers; the `<image>` placeholder is removed from the problem (the chat template places the image).
              One category, "all".
  jsonl       the project's own JSONL (`harmo_min.data.load_jsonl`, with its validation). Category: the task
              ("verifiable" / "open"); open items have no gold and are skipped in accuracy.
  dataset     a training table read exactly as training reads it (`harmo_min.data.load_table`: the column
              mapping `fields`, defaults `data.DEFAULT_FIELDS`, and its gold-answer rule): MMK12, ViRL39K,
              ThinkLite-VL test splits, or the project's records in parquet. Category: the task.
  synthetic   no file: `synthetic:N` or `synthetic:N:kind,kind` draws N built-in synthetic tasks
              (`harmo_min.synthetic.synthetic_examples`) with its own seed, so they are not the training draw.
              Category: the task kind.

Detection: `pid` or `answer_type` -> mathvista; `problem_version` -> mathverse; `id` -> jsonl (tables: dataset);
exactly problem/answer/images -> geometry3k; any other table -> dataset. Anything else is a `DataError` that names
the file, lists the fields it has and the fields each format expects. An unknown `FORMAT:` prefix is an error that
lists the formats.

Float golds need no rounding step: the verifier accepts a more precise prediction that rounds to the gold's
decimals, which is what MathVista's `precision` asks for.

Left out: MathVista's official answer extraction by an LLM (the project's rule verifier decides, as in training),
the original Geometry3K folder layout (one data.json per problem folder).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmo_min.data import (MAX_IMAGE_PIXELS, SHARD_NAME, TABLE_SUFFIXES, DataError, Example, ImageCheck, ImageLike,
                            image_value, load_jsonl, load_table, read_jsonl, read_table, read_text, table_columns,
                            table_files)
from harmo_min.synthetic import TASK_KINDS, kind_of, synthetic_examples

BENCHMARK_FORMATS = ("mathvista", "mathverse", "geometry3k", "jsonl", "dataset", "synthetic")
DISPLAY_NAMES = {"mathvista": "MathVista", "mathverse": "MathVerse", "geometry3k": "Geometry3K"}
EXPECTED_FIELDS = {
    "mathvista": "pid (or object key), question, image, answer, question_type, answer_type, "
                 "[choices, precision, unit, metadata, decoded_image]",
    "mathverse": "sample_index, question, image, answer, question_type, problem_version, [metadata]",
    "geometry3k": "problem, answer, images",
    "jsonl": "id, problem or messages, [images, answer, choices, task, constraints, reference]",
    "dataset": "a table with a problem/question column, answer/solution and images/decoded_image/image (--field)",
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
def is_table(path: str) -> bool:
    """A parquet / arrow file, a glob, or a folder (of shards, or from save_to_disk): read with pyarrow."""
    return any(c in path for c in "*?[") or Path(path).suffix in TABLE_SUFFIXES or Path(path).expanduser().is_dir()


def read_records(path: Path, limit: int | None = None) -> list[tuple[str, str | None, dict, Path]]:
    """(where, key, record, image root) from a JSON list, a JSON object of records keyed by id (key set), JSONL,
    or a table (`harmo_min.data.table_files`); the first `limit` records if given."""
    if is_table(str(path)):
        rows = itertools.islice(read_table(table_files(path)), limit)
        return [(where, None, row, file.parent) for where, file, row in rows]
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = read_text(path)
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
        records = [(where, None, record) for where, record in read_jsonl(path, text)]
    for where, _, record in records:  # JSON Lines records were checked by read_jsonl
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if not records:
        raise DataError(f"{path}: no records")
    return [(where, key, record, path.parent) for where, key, record in records[:limit]]


def detect_format(record: dict, where: str, *, table: bool = False) -> str:
    keys = set(record)
    if "pid" in keys or "answer_type" in keys:
        return "mathvista"
    if "problem_version" in keys:
        return "mathverse"
    if keys == {"problem", "answer", "images"}:
        return "geometry3k"
    if table:
        return "dataset"  # any other table: the training loader with its column mapping decides
    if "id" in keys:
        return "jsonl"
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


def _image(value: Any, key: str, root: Path, where: str, check: ImageCheck) -> ImageLike:
    """A path (relative to the file), encoded bytes or a {bytes, path} struct, decoded and capped by `check`."""
    at = f"{where}: field '{key}'"
    return check(image_value(value, at, root), at)


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


def parse_mathvista(record: dict, where: str, key: str | None, root: Path, check: ImageCheck) -> BenchItem:
    f = "mathvista"
    pid = str(key if record.get("pid") is None and key is not None else _field(record, "pid", (str, int), where, f))
    question = _field(record, "question", str, where, f)
    if record.get("decoded_image") is not None:  # the hub's parquet: the picture itself; `image` names a file
        image = _image(record["decoded_image"], "decoded_image", root, where, check)
    else:
        image = _image(_field(record, "image", str, where, f), "image", root, where, check)
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


def parse_mathverse(record: dict, where: str, key: str | None, root: Path, check: ImageCheck) -> BenchItem:
    f = "mathverse"
    sid = str(key if record.get("sample_index") is None and key is not None
              else _field(record, "sample_index", (str, int), where, f))
    question = record.get("question")
    if question is not None and not isinstance(question, str):
        raise DataError(f"{where}: field 'question': expected str, got {type(question).__name__}; {_expected(f)}")
    image = _image(_field(record, "image", (str, dict, bytes), where, f), "image", root, where, check)
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


def parse_geometry3k(record: dict, where: str, key: str | None, root: Path, check: ImageCheck) -> BenchItem:
    f = "geometry3k"
    problem = _field(record, "problem", str, where, f)
    images = _field(record, "images", list, where, f)
    if not images:
        raise DataError(f"{where}: field 'images': empty; {_expected(f)}")
    paths = [_image(im, f"images[{i}]", root, where, check) for i, im in enumerate(images)]
    text = problem.replace("<image>", "").strip()
    if not text:
        raise DataError(f"{where}: field 'problem': empty once the <image> placeholder is removed")
    example = Example(id=key or "", problem=text, images=paths, answer=_answer(record, where, f))
    return BenchItem(example, "", "all", where)


# ---------------------------------------------------------------------------------------------------- entry point
PARSERS = {"mathvista": parse_mathvista, "mathverse": parse_mathverse, "geometry3k": parse_geometry3k}


def load_benchmark(spec: str, *, limit: int | None = None, check_images: bool = True,
                   max_image_pixels: int | None = MAX_IMAGE_PIXELS, fields: dict[str, str | None] | None = None,
                   synthetic_seed: int = SYNTHETIC_SEED) -> Benchmark:
    """Load every item of one `--data` spec (see the module docstring); the first `limit` items if given.

    `fields` maps columns for the `dataset` format (as `data.fields` does in training); other formats have fixed
    fields and ignore it (`load_benchmarks` refuses it when no benchmark is a `dataset`).
    """
    name, fmt, raw_path = parse_spec(spec)
    if fmt == "synthetic":
        return _synthetic(name, raw_path, limit, synthetic_seed)
    if fmt is None:
        _refuse_unknown_prefix(spec, raw_path)
    path = Path(raw_path).expanduser()
    if fmt is None and is_table(raw_path):  # a table's columns tell its format without reading its rows
        fmt = detect_format(dict.fromkeys(table_columns(table_files(raw_path)[0])), raw_path, table=True)
    records = []
    if fmt not in ("jsonl", "dataset"):
        records = read_records(path, limit)
        fmt = fmt or detect_format(records[0][2], records[0][0])
    if fmt in ("jsonl", "dataset"):
        return _training_format(name, fmt, raw_path, limit, check_images, max_image_pixels, fields)
    check = ImageCheck(max_image_pixels, decode=check_images)
    bench_name = name or DISPLAY_NAMES[fmt]
    items, seen = [], {}
    for index, (where, key, record, root) in enumerate(records):
        # Geometry3K records carry no id: their position is the id.
        key = key if key is not None or fmt != "geometry3k" else str(index)
        item = PARSERS[fmt](record, where, key, root, check)
        item.benchmark = bench_name
        if item.example.id in seen:
            raise DataError(f"{where}: duplicate id {item.example.id!r} (first at {seen[item.example.id]})")
        seen[item.example.id] = where
        items.append(item)
    check.report()
    return Benchmark(bench_name, fmt, str(path), items)


def _training_format(name: str | None, fmt: str, raw_path: str, limit: int | None, check_images: bool,
                     max_image_pixels: int | None, fields: dict | None) -> Benchmark:
    """`jsonl` and `dataset`: the items exactly as training would read them. Category: the task."""
    path = Path(raw_path).expanduser()
    if fmt == "jsonl":
        if path.suffix != ".jsonl":
            raise DataError(f"{path}: looks like the project's own format, which is JSON Lines in a .jsonl file")
        examples = load_jsonl(path, check_images=check_images, max_image_pixels=max_image_pixels)[:limit]
    elif is_table(raw_path):
        examples = load_table(raw_path, fields=fields, check_images=check_images, max_image_pixels=max_image_pixels,
                              limit=limit)
    else:
        raise DataError(f"{raw_path}: the dataset format reads parquet/arrow tables (a file, a folder of shards, a "
                        f"glob or a save_to_disk folder)")
    bench_name = name or (path.stem if fmt == "jsonl" else _table_name(raw_path))
    items = [BenchItem(ex, bench_name, ex.task or "verifiable", f"{raw_path}[{ex.id!r}]") for ex in examples]
    return Benchmark(bench_name, fmt, str(path), items)


def _table_name(raw_path: str) -> str:
    """A table's display name: the dataset folder for hub shards (`mmk12/data/test-*.parquet` -> mmk12), else
    the file's stem or the folder's name."""
    parts = [p for p in Path(raw_path).expanduser().parts
             if p not in ("/", "data") and not any(c in p for c in "*?[")]
    if parts and SHARD_NAME.match(parts[-1]):
        parts.pop()
    return Path(parts[-1]).stem if parts else "dataset"


def _refuse_unknown_prefix(spec: str, raw_path: str) -> None:
    """`mathvsta:x.json` is a typo of a format, not a file name: say so (unless such a file exists)."""
    head, colon, _ = raw_path.partition(":")
    if colon and re.fullmatch(r"[A-Za-z][\w-]+", head) and not Path(raw_path).expanduser().exists():
        raise DataError(f"--data {spec}: unknown format {head!r}; expected one of {', '.join(BENCHMARK_FORMATS)}, "
                        f"or no FORMAT: to detect it from the fields")


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
    items = [BenchItem(ex, bench_name, kind_of(ex), f"synthetic[{i}]") for i, ex in enumerate(examples)]
    return Benchmark(bench_name, "synthetic", f"synthetic:{rest}", items)


def load_benchmarks(specs: list[str], **kwargs) -> list[Benchmark]:
    """Load several specs; two benchmarks may not share a name (their rows would mix in the results)."""
    benches = [load_benchmark(s, **kwargs) for s in specs]
    if kwargs.get("fields") and not any(b.format == "dataset" for b in benches):
        raise DataError(f"--field maps the columns of 'dataset' tables, and no --data is one "
                        f"(formats: {', '.join(b.format for b in benches)})")
    names = [b.name for b in benches]
    for b in benches:
        if names.count(b.name) > 1:
            raise DataError(f"two --data give the benchmark name {b.name!r}; rename one: --data NAME=FORMAT:PATH")
    return benches
