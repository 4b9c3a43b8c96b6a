r"""Training data: `Example`, the validated loaders (the project's JSONL, the hub's parquet / arrow tables,
preference pairs), image checks, batching, prompt building, and `python -m harmo_min.data convert`.

    Example(id="count-3", problem="How many circles are in the image?", images=[<PIL.Image>], answer="3")

An Example's `task` is "verifiable" (a gold `answer`, scored by the rule verifier) or "open" (scored by the reward
model), inferred from `answer`. `messages` (chat turns ending with a user turn; images are its `{"type": "image"}`
parts, in order) may replace `problem`; `constraints` are instruction checks (rewards.py). `images` hold paths, PIL
images or `EncodedImage`s (a table's compressed bytes), decoded per batch by `load_images`, never kept decoded.

Rules (the README's Data section is the user manual):
* The project's JSONL uses the Example field names, keeps its answers exactly as written, and reads image paths
  relative to the file (or `image_root`).
* A table is a .parquet or .arrow file, a glob, a folder of one split's shards, or a `save_to_disk` folder. Each
  field is read from the column `fields` names (config `data.fields`; a dotted name reads inside a struct), else
  from the first present of `DEFAULT_FIELDS`; no id column: the row number. `<image>` placeholders are removed from
  the problem (the chat template puts the images first). An image cell is encoded bytes, a `{bytes, path}` struct
  (bytes win) or a path (relative to the file's folder, or `image_root`); one image or a list.
* A table's gold is what `verifier.extract_answer` reads from the answer cell (the last <answer>, else the last
  \boxed{}, else "the answer is ...", else a short one-line answer; `$...$` unwrapped), else a one-line answer as
  written; a multi-line solution, or a \boxed{} / <answer> it cannot read, is an error. Numbers go through `str`.
* Every image is opened at load, and fully decoded on this rank's share (record i with i % world_size == rank): a
  truncated JPEG passes PIL's `verify()` and fails only on a decode. One over `max_image_pixels` is downscaled
  once, aspect kept (a JPEG stays JPEG, else PNG), alike on every rank; one over PIL's bomb limit is an error.
* A bad record, row, file or image is a `DataError` naming the file, line or row, and field.

Public API: `load_examples` (-> `load_jsonl` | `load_table`), `load_preference_jsonl`, `load_images`,
`iterate_batches`, `build_messages`, `encode_prompts`, `convert` (`python -m harmo_min.data convert IN OUT.jsonl`).
Synthetic tasks and pairs live in synthetic.py. Tables need pyarrow, an optional extra (`pip install -e ".[data]"`).
Left out: video, multi-turn rollouts, streaming (a table's compressed images are held in memory, about the size
of its files, on every rank), verl's parquet layout (a `prompt` column of chat turns), EXIF orientation.
"""

from __future__ import annotations

import argparse
import functools
import glob
import io
import itertools
import json
import logging
import math
import os
import random
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

from PIL import Image

from harmo_min.rewards import ANSWER_FORMATS, validate_constraint
from harmo_min.verifier import extract_answer

log = logging.getLogger("harmo_min.data")

# The instruction appended to each prompt, by answer format (a config key). "bare" asks for the answer alone:
# the tiny config uses it so a randomly initialised model can reach the answer tokens by sampling.
FORMAT_INSTRUCTIONS = {
    "think_answer": "Think step by step inside <think> </think>, then give the final answer inside <answer> </answer>.",
    "boxed": "Reason step by step, then put the final answer in \\boxed{}.",
    "bare": "Reply with the answer only.",
}
assert tuple(FORMAT_INSTRUCTIONS) == ANSWER_FORMATS  # one list of answer formats: the reward's format check reads it

# Larger images are downscaled once at load, to the cap EasyR1 and verl apply before Qwen2.5-VL's processor
# (benchmarks/bench_data.py measures what an uncapped one costs every step that draws it).
MAX_IMAGE_PIXELS = 2048 * 2048

# Table columns each field is read from by default, first present wins.
DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "id": ("id", "qid", "pid", "sample_index"), "problem": ("problem", "question"),
    "answer": ("answer", "solution"), "images": ("images", "decoded_image", "image"),
}
TABLE_SUFFIXES = (".parquet", ".arrow")
# The hub's shard names: train-00000-of-00002.parquet (MathVista adds a hash: testmini-00000-of-00001-a1b2.parquet).
SHARD_NAME = re.compile(r"^(?P<split>.+?)-(?P<index>\d{5})-of-(?P<count>\d{5})(?:-[0-9a-f]+)?\.(?:parquet|arrow)$")


class DataError(ValueError):
    """A malformed example, record or file; the message names the file, line (or row) and field."""


@dataclass(frozen=True, repr=False)
class EncodedImage:
    """An image kept compressed, as a parquet or arrow file stored it, until a batch needs its pixels."""
    data: bytes
    name: str  # where it came from ("train.parquet:row 3: field 'image'"): named by decode errors

    def __repr__(self) -> str:
        return f"EncodedImage({len(self.data)} bytes, {self.name})"


ImageLike = str | Image.Image | EncodedImage


@dataclass
class Example:
    id: str
    problem: str | None = None
    messages: list[dict[str, Any]] | None = None
    images: list[ImageLike] = field(default_factory=list)
    answer: str | None = None
    choices: list[str] | None = None
    task: Literal["verifiable", "open"] | None = None
    constraints: list[dict[str, Any]] = field(default_factory=list)
    reference: str | None = None

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = "verifiable" if self.answer is not None else "open"
        if (self.problem is None) == (self.messages is None):
            raise DataError(f"example {self.id!r}: give exactly one of 'problem' or 'messages'")
        if self.task == "verifiable" and self.answer is None:
            raise DataError(f"example {self.id!r}: field 'answer': a verifiable example needs a gold answer")


def load_examples(source: str | os.PathLike, *, fields: dict[str, str | None] | None = None,
                  image_root: str | os.PathLike | None = None, check_images: bool = True,
                  max_image_pixels: int | None = MAX_IMAGE_PIXELS, rank: int = 0, world_size: int = 1) -> list[Example]:
    """Every example of the project's JSONL or a table, validated. `fields`: config `data.fields`;
    `check_images=False` trusts the images (no decode, no cap); rank i of `world_size` fully decodes its share."""
    if not 0 <= rank < world_size:
        raise ValueError(f"load_examples: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    kwargs = dict(image_root=image_root, check_images=check_images, max_image_pixels=max_image_pixels, rank=rank,
                  world_size=world_size)
    if not str(source).endswith(".jsonl"):
        return load_table(source, fields=fields, **kwargs)
    if fields:
        raise DataError(f"data.fields: maps the columns of parquet/arrow tables; {source} is the project's JSONL, "
                        f"whose records use the Example field names (see harmo_min/data.py)")
    return load_jsonl(source, **kwargs)


def _load(source, records: Iterable[tuple[str, Any]], parse: Callable, id_field: str | None, check_images: bool,
          max_image_pixels: int | None, rank: int = 0, world_size: int = 1) -> list:
    """The loop of every loader: `parse(record, where, check, full)` for each (where, record) in order, with one
    ImageCheck, `full` on this rank's share (index % world_size == rank); a repeated id, or none, is a DataError."""
    check = ImageCheck(max_image_pixels, decode=check_images)
    items, seen = [], {}
    for index, (where, record) in enumerate(records):
        item = parse(record, where, check, index % world_size == rank)
        if item.id in seen:
            raise DataError(f"{where}: field '{id_field}': duplicate id {item.id!r} (first at {seen[item.id]})")
        seen[item.id] = where
        items.append(item)
    if not items:
        raise DataError(f"{source}: no records")
    check.report(rank)
    return items


# ------------------------------------------------------------------------------------------------- the project's JSONL

_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str, int), "problem": (str,), "messages": (list,), "images": (list,), "answer": (str, int, float),
    "choices": (list,), "task": (str,), "constraints": (list,), "reference": (str,),
}


def load_jsonl(path: str | os.PathLike, *, check_images: bool = True, max_image_pixels: int | None = MAX_IMAGE_PIXELS,
               image_root: str | os.PathLike | None = None, rank: int = 0, world_size: int = 1) -> list[Example]:
    """Read and validate every record of a JSONL file; the first bad one raises `DataError("file:line: field ...")`."""
    path = Path(path)
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    return _load(path, read_jsonl(path), functools.partial(parse_record, root=root), "id", check_images,
                 max_image_pixels, rank, world_size)


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file (a leading BOM dropped); bytes that are not UTF-8 are a DataError naming file:line."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8-sig")  # drops the BOM Windows editors write
    except UnicodeDecodeError as err:
        body = err.object  # the bytes after the BOM
        line = body.count(b"\n", 0, err.start) + 1
        column = err.start - (body.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {body[err.start]:#04x} at column {column}); "
                        f"save the file as UTF-8") from None


def read_jsonl(path: str | os.PathLike, text: str | None = None) -> Iterator[tuple[str, dict]]:
    """Yield ("file:line", record) for every non-blank line; a line that is not a JSON object is a DataError.
    `text`: the file's contents when the caller has read them already."""
    path = Path(path)
    if text is None:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        text = read_text(path)
    # Only "\n" ends a record: str.splitlines() would also split at U+2028 and friends, which JSON strings may hold.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def parse_record(record: dict, where: str, check: ImageCheck, full: bool = True, *, root: Path) -> Example:
    """One JSONL record -> Example, every field checked; images opened by `check` (decoded fully when `full`)."""
    _check_types(record, where, _FIELD_TYPES, required=("id",), nullable=True)
    if (record.get("problem") is None) == (record.get("messages") is None):  # null counts as absent
        raise DataError(f"{where}: field 'problem': give exactly one of 'problem' or 'messages'")
    if record.get("task") not in (None, "verifiable", "open"):
        raise DataError(f"{where}: field 'task': must be 'verifiable' or 'open', got {record['task']!r}")
    if record.get("task") == "verifiable" and record.get("answer") is None:
        raise DataError(f"{where}: field 'answer': missing, but task is 'verifiable'")
    n_placeholders = check_messages(record["messages"], where) if record.get("messages") is not None else 0
    for i, choice in enumerate(record.get("choices") or []):
        if not isinstance(choice, str):
            raise DataError(f"{where}: field 'choices[{i}]': expected str, got {type(choice).__name__}")
    for i, constraint in enumerate(record.get("constraints") or []):
        try:
            validate_constraint(constraint)
        except ValueError as err:
            raise DataError(f"{where}: field 'constraints[{i}]': {err}") from None
    images = []
    for i, item in enumerate(record.get("images") or []):
        at = f"{where}: field 'images[{i}]'"
        if not isinstance(item, str) or not item:
            raise DataError(f"{at}: expected a path string, got {item!r:.60}")
        images.append(check(image_value(item, at, root), at, full=full))
    if record.get("messages") is not None and n_placeholders != len(images):
        raise DataError(f"{where}: field 'images': {len(images)} image(s) but {n_placeholders} image part(s) in "
                        f"messages")
    answer = record.get("answer")
    return Example(id=str(record["id"]), images=images, answer=None if answer is None else str(answer),
                   constraints=record.get("constraints") or [],
                   **{key: record.get(key) for key in ("problem", "messages", "choices", "task", "reference")})


def check_messages(messages: list, where: str) -> int:
    """Validate chat turns the way the chat template will read them; return the number of image parts."""
    if not messages:
        raise DataError(f"{where}: field 'messages': empty; expected chat turns ending with a user turn")
    n_images = 0
    for i, message in enumerate(messages):
        at = f"{where}: field 'messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{at}': expected {{'role': system|user|assistant, 'content': ...}}")
        if "content" not in message:
            raise DataError(f"{at}.content': missing")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise DataError(f"{at}.content': expected a string or a list of parts, got {type(content).__name__}")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                n_images += 1
            elif kind != "text" or not isinstance(part.get("text"), str):
                raise DataError(f"{at}.content[{j}]': expected {{'type': 'text', 'text': str}} or "
                                f"{{'type': 'image'}}, got {part!r:.80}")
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: field 'messages': must end with a user turn (the response answers it)")
    return n_images


def _check_types(record: dict, where: str, types: dict[str, tuple[type, ...]], *, required: Sequence[str],
                 nullable: bool) -> None:
    """Unknown, missing and wrongly typed fields of one JSONL record (a bool is not an int here)."""
    unknown = set(record) - set(types)
    if unknown:
        raise DataError(f"{where}: unknown field(s) {sorted(unknown)}; expected some of {sorted(types)}")
    for key in required:
        if key not in record:
            raise DataError(f"{where}: field '{key}': missing")
    for key, value in record.items():
        if not (nullable and value is None) and not isinstance(value, types[key]) or isinstance(value, bool):
            names = "/".join(t.__name__ for t in types[key])
            raise DataError(f"{where}: field '{key}': expected {names}, got {type(value).__name__}")


# ------------------------------------------------------------------------ tables: parquet, arrow, save_to_disk folders

def load_table(source: str | os.PathLike, *, fields: dict[str, str | None] | None = None,
               image_root: str | os.PathLike | None = None, check_images: bool = True,
               max_image_pixels: int | None = MAX_IMAGE_PIXELS, rank: int = 0, world_size: int = 1,
               limit: int | None = None) -> list[Example]:
    """Every row of a parquet / arrow table as an Example (the first `limit` rows if given)."""
    files = table_files(source)
    mapping = resolve_fields(fields, table_columns(files[0]), str(files[0]))
    columns = sorted({column.split(".")[0] for column in mapping.values() if column is not None})
    root = Path(image_root).expanduser() if image_root is not None else None

    def parse(item: tuple[int, Path, dict], where: str, check: ImageCheck, full: bool) -> Example:
        index, file, row = item
        ident = str(index)
        if mapping["id"] is not None:
            ident = _cell(row, mapping["id"], where)
            if isinstance(ident, bool) or not isinstance(ident, (str, int)) or ident == "":
                raise DataError(f"{where}: field '{mapping['id']}': expected a non-empty str or int id, "
                                f"got {ident!r:.60}")
        problem = _cell(row, mapping["problem"], where)
        if not isinstance(problem, str):
            raise DataError(f"{where}: field '{mapping['problem']}': expected str, got {type(problem).__name__}")
        problem = problem.replace("<image>", "").strip()
        if not problem:
            raise DataError(f"{where}: field '{mapping['problem']}': empty once <image> placeholders are removed")
        answer = None
        if mapping["answer"] is not None:
            answer = gold_answer(_cell(row, mapping["answer"], where), f"{where}: field '{mapping['answer']}'")
        cell = None if mapping["images"] is None else _cell(row, mapping["images"], where)
        images = []
        for k, value in enumerate(cell if isinstance(cell, list) else [] if cell is None else [cell]):
            at = f"{where}: field '{mapping['images']}" + (f"[{k}]'" if isinstance(cell, list) else "'")
            images.append(check(image_value(value, at, root or file.parent), at, full=full))
        return Example(id=str(ident), problem=problem, images=images, answer=answer)

    rows = enumerate(itertools.islice(read_table(files, columns), limit))
    return _load(source, ((where, (index, file, row)) for index, (where, file, row) in rows), parse, mapping["id"],
                 check_images, max_image_pixels, rank, world_size)


def table_files(source: str | os.PathLike) -> list[Path]:
    """The data files of a table: a .parquet/.arrow file, a glob, a folder of shards, or a save_to_disk folder."""
    text = os.path.expanduser(str(source))
    path = Path(text)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).suffix in TABLE_SUFFIXES)
        if not files:
            raise DataError(f"{source}: no .parquet or .arrow files match")
    elif path.is_file():
        if path.suffix not in TABLE_SUFFIXES:
            raise DataError(f"{path}: not a table file (expected .parquet or .arrow; the project's own format is "
                            f".jsonl)")
        return [path]
    elif not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    elif (path / "dataset_dict.json").is_file():
        splits = _read_json(path / "dataset_dict.json").get("splits", [])
        raise DataError(f"{path}: a DatasetDict saved with save_to_disk, splits {splits}: give one split's folder, "
                        f"e.g. {path / (splits[0] if splits else 'train')}")
    elif (path / "state.json").is_file():  # datasets.save_to_disk: state.json lists the arrow shards in order
        files = [path / entry["filename"] for entry in _read_json(path / "state.json").get("_data_files", [])
                 if isinstance(entry, dict) and isinstance(entry.get("filename"), str)]
        missing = [f.name for f in files if not f.is_file()]
        if not files or missing:
            raise DataError(f"{path}/state.json: names no data files, or missing ones: {missing}")
        return files
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in TABLE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path}: no .parquet or .arrow files in this folder")
    # Files named like hub shards must be one split, complete; other names are taken as they are.
    matches = [SHARD_NAME.match(f.name) for f in files]
    if not all(matches):
        return files
    splits = sorted({(f.parent, m["split"]) for f, m in zip(files, matches)})
    if len(splits) > 1:
        (parent, split), names = splits[0], sorted({split for _, split in splits})
        raise DataError(f"{source}: holds several splits ({', '.join(names)}): give one, "
                        f"e.g. {parent}/{split}-*.parquet")
    count = int(matches[0]["count"])
    missing = sorted(set(range(count)) - {int(m["index"]) for m in matches})
    if missing or any(int(m["count"]) != count for m in matches):
        raise DataError(f"{source}: split '{splits[0][1]}' is incomplete: shard(s) {missing} of {count} are missing "
                        f"(an interrupted download?)")
    return files


def table_columns(path: Path) -> list[str]:
    """The column names of one parquet or arrow file."""
    return _open_table(path, None)[0]


def read_table(files: list[Path], columns: list[str] | None = None) -> Iterator[tuple[str, Path, dict]]:
    """("file:row N", file, row) for every row in order, as Python values: structs are dicts, binary is bytes."""
    pa, _ = _pyarrow(files[0])
    for path in files:
        names, batches = _open_table(path, columns)
        missing = [c for c in columns or [] if c not in names]
        if missing:
            raise DataError(f"{path}: no column(s) {missing}; its columns are {names}")
        i = 0
        try:
            for batch in batches:  # read lazily: the caller may stop after a few rows
                for row in batch.to_pylist():
                    yield f"{path}:row {i}", path, row
                    i += 1
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: unreadable after row {i} ({err})") from None


def resolve_fields(fields: dict[str, str | None] | None, columns: Sequence[str], source: str) -> dict[str, str | None]:
    """The column (or dotted path into a struct column) each Example field is read from; None: not read."""
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(DEFAULT_FIELDS))
    if unknown:
        raise DataError(f"data.fields: unknown field(s) {unknown}; expected some of {list(DEFAULT_FIELDS)}")
    resolved: dict[str, str | None] = {}
    for name, candidates in DEFAULT_FIELDS.items():
        column = fields[name] if name in fields else next((c for c in candidates if c in columns), None)
        if name not in fields and column is None and name != "id":  # a silent "no gold" would train the wrong thing
            hint = {"problem": "", "answer": " (or null: no gold, every item open)",
                    "images": " (or null: text-only prompts)"}[name]
            raise DataError(f"{source}: no column for '{name}' (looked for {', '.join(candidates)}); the columns are "
                            f"{list(columns)}: set data.fields.{name}{hint}")
        if column is None and name == "problem":
            raise DataError("data.fields.problem: cannot be null: every example needs a problem")
        if column is not None and (not isinstance(column, str) or not column):
            raise DataError(f"data.fields.{name}: expected a column name or null, got {column!r}")
        if column is not None and column.split(".")[0] not in columns:
            raise DataError(f"{source}: data.fields.{name}: no column {column.split('.')[0]!r}; "
                            f"the columns are {list(columns)}")
        resolved[name] = column
    return resolved


def gold_answer(value: Any, where: str) -> str:
    """The gold a table's answer cell holds, by the rule in the module docstring (the verifier's extraction)."""
    if value is None:
        raise DataError(f"{where}: missing; every row needs a gold answer (data.fields.answer: null trains every "
                        f"item as open)")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: expected a str or number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{where}: expected a finite number, got {value}")
    if not isinstance(value, str):
        return str(value)
    text = value.strip()
    if not text:
        raise DataError(f"{where}: empty")
    found = extract_answer(text)
    if found is not None:
        return found
    if "\n" in text or "\\boxed" in text or "\\fbox" in text or "<answer>" in text.lower():
        raise DataError(f"{where}: no final answer in {text[:80]!r}: expected \\boxed{{...}}, <answer>...</answer>, "
                        f"'the answer is ...' or the answer alone")
    return text


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _pyarrow(source: Path):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{source}: reading parquet/arrow files needs pyarrow, an optional extra: "
                        f"pip install -e '.[data]' (or pip install pyarrow)") from None
    return pyarrow, pyarrow.parquet


def _open_table(path: Path, columns: list[str] | None):
    """(column names, an iterator of record batches of the `columns` it has) for one parquet or arrow file."""
    pa, pq = _pyarrow(path)
    try:
        if path.suffix == ".parquet":
            parquet = pq.ParquetFile(path)
            names = parquet.schema_arrow.names
            return names, parquet.iter_batches(batch_size=64, columns=[c for c in columns or names if c in names])
        with path.open("rb") as f:
            is_file_format = f.read(6) == b"ARROW1"  # save_to_disk writes the stream format, Feather v2 the file one
        reader = (pa.ipc.open_file if is_file_format else pa.ipc.open_stream)(pa.memory_map(str(path)))
        names = reader.schema.names
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if is_file_format else reader
        return names, (batch.select([c for c in columns or names if c in names]) for batch in batches)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable {path.suffix[1:]} file ({err})") from None


def _cell(row: dict, column: str, where: str) -> Any:
    value = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(f"{where}: field '{column}': missing (no {part!r} in {type(value).__name__})")
        value = value[part]
    return value


# -------------------------------------------------------------- images: references, checks at load, decoding per batch

def image_value(value: Any, where: str, root: Path) -> str | EncodedImage:
    """One image as a file stores it: a path (relative to `root`), encoded bytes, or a {bytes, path} struct."""
    if isinstance(value, dict) and value and set(value) <= {"bytes", "path"}:  # datasets' Image feature
        if value.get("bytes"):
            return EncodedImage(bytes(value["bytes"]), where)
        if not value.get("path"):
            raise DataError(f"{where}: an image struct with neither bytes nor a path")
        value = value["path"]
    if isinstance(value, (bytes, bytearray)) and value:
        return EncodedImage(bytes(value), where)
    if isinstance(value, str) and value:
        return str(root / value)  # an absolute path stays as it is
    raise DataError(f"{where}: expected an image (a path, encoded bytes or a {{bytes, path}} struct), "
                    f"got {value!r:.60}")


@dataclass
class ImageCheck:
    """Opens each image as a loader reads it and, with `full`, decodes it as `load_images` will (the rules in the
    module docstring); `report` logs the downscaled ones. `decode=False` trusts the files: nothing opened or capped."""
    max_pixels: int | None = MAX_IMAGE_PIXELS
    decode: bool = True
    downscaled: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_pixels is not None and (isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int)
                                            or self.max_pixels < 1):
            raise ValueError(f"data.max_image_pixels: must be an int >= 1 or null (no cap), got {self.max_pixels!r}")

    def __call__(self, image: str | EncodedImage, where: str, *, full: bool = True) -> str | EncodedImage:
        if not self.decode:
            return image
        label = image if isinstance(image, str) else f"({len(image.data)} embedded bytes)"
        try:
            with warnings.catch_warnings():
                # PIL warns above ~89 M pixels; the cap below decides what happens to large images.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(_source(image)) as im:
                    if self.max_pixels is not None and im.width * im.height > self.max_pixels:
                        return self._downscale(im, where)
                    if full:
                        im.convert("RGB")  # the only way to catch a truncated JPEG or a broken PNG stream
        except FileNotFoundError:
            raise DataError(f"{where}: no such file {image}") from None
        except Image.DecompressionBombError as err:
            raise DataError(f"{where}: image {label} is over PIL's decompression-bomb limit ({err})") from None
        except Exception as err:  # PIL reports corrupt data as OSError, SyntaxError, zlib.error, ...: all "unreadable"
            raise DataError(f"{where}: unreadable image {label} ({type(err).__name__}: {err})") from None
        return image

    def _downscale(self, im: Image.Image, where: str) -> EncodedImage:
        """Shrink to the largest same-aspect size within the cap (in integers: 10000² -> 2048² exactly)."""
        width, height = im.size
        new_width = max(1, math.isqrt(self.max_pixels * width // height))  # w'² <= M·w/h, h' <= w'·h/w: w'·h' <= M
        target = (new_width, max(1, new_width * height // width))
        fmt = im.format
        if fmt == "JPEG":
            im.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 scale: a 100 M pixel JPEG in a fraction of the time
        rgb = im if im.mode == "RGB" else im.convert("RGB")  # no copy of a 300 MB bitmap when it is RGB already
        small = rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
        buffer = io.BytesIO()
        small.save(buffer, "JPEG" if fmt == "JPEG" else "PNG", quality=95, compress_level=1)  # each reads its own
        self.downscaled.append(f"{where} {width}x{height} -> {target[0]}x{target[1]}")
        return EncodedImage(buffer.getvalue(), where)

    def report(self, rank: int = 0) -> None:
        """Log what was downscaled (rank 0 only: every rank downscales the same images)."""
        if self.downscaled and rank == 0:
            more = f"; and {len(self.downscaled) - 3} more" if len(self.downscaled) > 3 else ""
            log.warning(f"data: {len(self.downscaled)} image(s) over {self.max_pixels} pixels downscaled once at load "
                        f"(aspect kept): {'; '.join(self.downscaled[:3])}{more}")


def load_images(example: Example) -> list[Image.Image]:
    """The example's images as RGB PIL images, decoded per batch, never kept; one that fails is a DataError."""
    images = []
    for image in example.images:
        if not isinstance(image, Image.Image):
            try:
                with Image.open(_source(image)) as im:
                    image = im.convert("RGB")
            except Exception as err:  # as in ImageCheck: PIL has many ways of saying "unreadable"
                name = image if isinstance(image, str) else image.name
                raise DataError(f"{name}: unreadable image ({type(err).__name__}: {err})") from err
        images.append(image)
    return images


def _source(image: str | EncodedImage):
    return image if isinstance(image, str) else io.BytesIO(image.data)


def iterate_batches(examples: list[Example], batch_size: int, *, seed: int, start: int = 0) -> Iterator[list[Example]]:
    """Endless shuffled batches; epoch e uses permutation seed+e, so position `start` (in batches) can be resumed."""
    per_epoch = len(examples) // batch_size
    if per_epoch == 0:
        raise ValueError(f"data: {len(examples)} examples cannot fill one batch of {batch_size}")
    for position in itertools.count(start):
        epoch, offset = divmod(position, per_epoch)
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        yield [examples[i] for i in order[offset * batch_size:(offset + 1) * batch_size]]


# -------------------------------------------------------------------- preference pairs (the reward-model stage's data)

@dataclass
class PreferencePair:
    id: str
    example: Example       # the prompt and its images
    chosen: str
    rejected: str
    aspect: str | None = None  # the aspect the preference is about; None: overall only
    chosen_ratings: dict[str, float] = field(default_factory=dict)
    rejected_ratings: dict[str, float] = field(default_factory=dict)


_PAIR_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str, int), "prompt": (str,), "messages": (list,), "images": (list,), "chosen": (str,),
    "rejected": (str,), "aspect": (str,), "chosen_ratings": (dict,), "rejected_ratings": (dict,),
}


def load_preference_jsonl(path: str | os.PathLike, *, aspects: Sequence[str] | None = None, check_images: bool = True,
                          max_image_pixels: int | None = MAX_IMAGE_PIXELS) -> list[PreferencePair]:
    """Read and validate preference pairs (JSONL records of `_PAIR_FIELDS`; the prompt is checked as training's
    prompts are); raise `DataError("file:line: field 'x': ...")` on the first bad record."""
    path = Path(path)

    def parse(record: dict, where: str, check: ImageCheck, full: bool) -> PreferencePair:
        _check_types(record, where, _PAIR_FIELDS, required=("id", "chosen", "rejected"), nullable=False)
        if ("prompt" in record) == ("messages" in record):
            raise DataError(f"{where}: field 'prompt': give exactly one of 'prompt' or 'messages'")
        for key in ("chosen", "rejected"):
            if any(t in record[key] for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>")):
                raise DataError(f"{where}: field '{key}': contains a vision placeholder token; images go in 'images'")
        if record["chosen"] == record["rejected"]:
            raise DataError(f"{where}: field 'rejected': identical to 'chosen', the pair carries no preference")
        if "aspect" in record and aspects is not None and record["aspect"] not in aspects:
            raise DataError(f"{where}: field 'aspect': {record['aspect']!r} is not one of the model's aspects "
                            f"{list(aspects)}")
        ratings = {}
        for key in ("chosen_ratings", "rejected_ratings"):
            for name, value in record.get(key, {}).items():
                if aspects is not None and name not in aspects:
                    raise DataError(f"{where}: field '{key}.{name}': not one of the model's aspects {list(aspects)}")
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                    raise DataError(f"{where}: field '{key}.{name}': expected a finite number, got {value!r}")
            ratings[key] = {name: float(value) for name, value in record.get(key, {}).items()}
        prompt = {"id": record["id"], "images": record.get("images", [])}
        prompt.update({"problem": record["prompt"]} if "prompt" in record else {"messages": record["messages"]})
        example = parse_record(prompt, where, check, full, root=path.parent)  # checked as training's prompts are
        return PreferencePair(id=example.id, example=example, chosen=record["chosen"], rejected=record["rejected"],
                              aspect=record.get("aspect"), **ratings)

    return _load(path, read_jsonl(path), parse, "id", check_images, max_image_pixels)


# ------------------------------------------------------------------------------------------------------------- prompts

def build_messages(example: Example, answer_format: str = "think_answer") -> list[dict[str, Any]]:
    """Chat turns for `example`, the answer-format instruction appended to the last user turn."""
    if answer_format not in FORMAT_INSTRUCTIONS:
        raise ValueError(f"answer_format: unknown {answer_format!r}; expected one of {list(FORMAT_INSTRUCTIONS)}")
    instruction = FORMAT_INSTRUCTIONS[answer_format]
    if example.messages is None:
        content = [{"type": "image"} for _ in example.images]
        return [{"role": "user", "content": content + [{"type": "text", "text": f"{example.problem} {instruction}"}]}]
    messages = [dict(m) for m in example.messages]
    last = messages[-1]
    if isinstance(last["content"], str):
        last["content"] = f"{last['content']} {instruction}"
    else:
        last["content"] = list(last["content"]) + [{"type": "text", "text": f" {instruction}"}]
    return messages


def encode_prompts(processor, examples: list[Example], answer_format: str = "think_answer"):
    """One left-padded batch, encoded once and reused by the sampler and the training forward: input_ids,
    attention_mask, mm_token_type_ids, and pixel_values / image_grid_thw if any."""
    texts = [processor.apply_chat_template(build_messages(ex, answer_format), add_generation_prompt=True,
                                           tokenize=False) for ex in examples]
    images = [im for ex in examples for im in load_images(ex)]
    processor.tokenizer.padding_side = "left"  # the sampler appends new tokens on the right of every row
    return processor(text=texts, images=images or None, padding=True, return_tensors="pt")


# ------------------------------------------------------------------------------------ python -m harmo_min.data convert

def convert(source: str | os.PathLike, out: str | os.PathLike, *, fields: dict[str, str | None] | None = None,
            image_root: str | os.PathLike | None = None, check_images: bool = True,
            max_image_pixels: int | None = MAX_IMAGE_PIXELS) -> int:
    """Write `source` (any layout `load_examples` reads) as the project's JSONL; return the number of records.
    Embedded images are written byte for byte (downscaled ones as re-encoded) to `OUT_images/NNNNNN-K.ext`;
    image files are referenced by their path relative to OUT's folder, not copied."""
    out = Path(out)
    if out.suffix != ".jsonl":
        raise DataError(f"{out}: the output is the project's JSONL: give it a .jsonl name")
    examples = load_examples(source, fields=fields, image_root=image_root, check_images=check_images,
                             max_image_pixels=max_image_pixels)
    image_dir = out.with_name(out.stem + "_images")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, example in enumerate(examples):
        paths = []
        for k, image in enumerate(example.images):
            if isinstance(image, EncodedImage):
                try:  # the header only: with check_images False a truncated image is copied as it is
                    with Image.open(io.BytesIO(image.data)) as im:
                        suffix = {"JPEG": ".jpg", "TIFF": ".tif"}.get(im.format, f".{str(im.format).lower()}")
                except OSError as err:
                    raise DataError(f"{image.name}: not an image ({err})") from None
                image_dir.mkdir(exist_ok=True)
                target = image_dir / f"{index:06d}-{k}{suffix}"
                target.write_bytes(image.data)
                image = str(target)
            assert isinstance(image, str), "load_examples yields paths or EncodedImages"
            paths.append(os.path.relpath(image, out.parent))
        values = dict(vars(example), images=paths)
        record = {key: value for key, value in values.items() if value is not None and value != []}
        if (example.answer is not None) == (example.task == "verifiable"):
            del record["task"]  # the loader infers it
        lines.append(json.dumps(record, ensure_ascii=False))
    partial = out.with_name(out.name + ".tmp")
    partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    partial.replace(out)  # a reader never sees half a file
    return len(lines)


def parse_field_overrides(items: Sequence[str]) -> dict[str, str | None]:
    """["problem=question", "answer="] -> {"problem": "question", "answer": None} (the --field options)."""
    fields: dict[str, str | None] = {}
    for item in items:
        name, eq, column = item.partition("=")
        if not eq or name not in DEFAULT_FIELDS:
            raise DataError(f"--field {item}: expected FIELD=COLUMN with FIELD one of {list(DEFAULT_FIELDS)} "
                            f"(FIELD= for none)")
        fields[name] = column or None
    return fields


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harmo_min.data",
                                     description="Write any training-data layout as the project's JSONL.")
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("convert", help="IN (JSONL, parquet file/folder/glob, arrow, save_to_disk) -> OUT.jsonl")
    c.add_argument("source", metavar="IN")
    c.add_argument("out", metavar="OUT.jsonl")
    c.add_argument("--field", action="append", default=[], metavar="FIELD=COLUMN",
                   help=f"column for a field, repeatable; FIELD one of {list(DEFAULT_FIELDS)}; FIELD= for none")
    c.add_argument("--image-root", help="folder that relative image paths start from [the data file's folder]")
    c.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help=f"downscale larger images [{MAX_IMAGE_PIXELS}]; 0: no cap")
    c.add_argument("--no-check", action="store_true", help="do not decode the images (truncated ones are copied; bytes that are no image still fail)")
    args = parser.parse_args(argv)
    try:
        n = convert(args.source, args.out, fields=parse_field_overrides(args.field), image_root=args.image_root,
                    check_images=not args.no_check, max_image_pixels=args.max_image_pixels or None)
    except DataError as err:
        sys.exit(f"{parser.prog}: error: {err}")
    print(f"wrote {n} records to {args.out}")
    return n


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
