"""Examples, the validated JSONL loaders (prompts and preference pairs), batching, and prompt building.

An `Example` is one prompt of a GRPO batch:

    Example(id="count-3", problem="How many circles are in the image?", images=[<PIL.Image>], answer="3")

* `task` is "verifiable" (has a gold `answer`; the rule verifier scores it) or "open" (no gold; the reward model
  scores it). It is inferred from `answer` when absent.
* `constraints` are instruction-adherence checks (`{"kind": "max_words", "value": 30}`, see rewards.py).
* `messages` (chat turns) may replace `problem`; images are then the `{"type": "image"}` parts, in order.

JSONL records use the same field names; `images` holds paths relative to the file (or absolute). Every record is
validated before training starts: a bad record raises `DataError("file.jsonl:12: field 'answer': ...")`.

Preference pairs (the reward-model stage's data) are JSONL records `{"id", "prompt" | "messages", "images",
"chosen", "rejected", "aspect"?, "chosen_ratings"?, "rejected_ratings"?}`, validated the same way. The built-in
synthetic tasks and pairs live in synthetic.py.

Prompts are built with the processor's chat template and encoded **once** into left-padded tensors that both the
sampler and the training forward reuse. Left out: video, multi-turn rollouts, dataset streaming.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from PIL import Image

from harmo_min.rewards import ANSWER_FORMATS, validate_constraint

ImageLike = str | Image.Image

# The instruction appended to each prompt, by answer format (a config key). "bare" asks for the answer alone:
# the tiny config uses it so a randomly initialised model can reach the answer tokens by sampling.
FORMAT_INSTRUCTIONS = {
    "think_answer": "Think step by step inside <think> </think>, then give the final answer inside <answer> </answer>.",
    "boxed": "Reason step by step, then put the final answer in \\boxed{}.",
    "bare": "Reply with the answer only.",
}
assert tuple(FORMAT_INSTRUCTIONS) == ANSWER_FORMATS  # one list of answer formats: the reward's format check reads it

class DataError(ValueError):
    """A malformed example or record; the message names the file, line and field."""


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


# ---------------------------------------------------------------------------------------------------------------
# JSONL loading with validation
# ---------------------------------------------------------------------------------------------------------------

_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str, int), "problem": (str,), "messages": (list,), "images": (list,), "answer": (str, int, float),
    "choices": (list,), "task": (str,), "constraints": (list,), "reference": (str,),
}


def load_jsonl(path: str | os.PathLike, *, check_images: bool = True) -> list[Example]:
    """Read and validate every record of a JSONL file; raise `DataError` naming `file:line: field` on the first bad one."""
    path = Path(path)
    examples, seen = [], set()
    for where, record in read_jsonl(path):
        examples.append(parse_record(record, where, path.parent, check_images, validate_constraint))
        if examples[-1].id in seen:
            raise DataError(f"{where}: field 'id': duplicate id {examples[-1].id!r}")
        seen.add(examples[-1].id)
    if not examples:
        raise DataError(f"{path}: no records")
    return examples


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield ("file:line", record) for every non-blank line; a line that is not a JSON object is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
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


def parse_record(record: dict, where: str, root: Path, check_images: bool, validate_constraint) -> Example:
    unknown = set(record) - set(_FIELD_TYPES)
    if unknown:
        raise DataError(f"{where}: unknown field(s) {sorted(unknown)}; expected some of {sorted(_FIELD_TYPES)}")
    if "id" not in record:
        raise DataError(f"{where}: field 'id': missing")
    for key, value in record.items():
        if value is not None and not isinstance(value, _FIELD_TYPES[key]) or isinstance(value, bool):
            names = "/".join(t.__name__ for t in _FIELD_TYPES[key])
            raise DataError(f"{where}: field '{key}': expected {names}, got {type(value).__name__}")
    if ("problem" in record) == ("messages" in record):
        raise DataError(f"{where}: field 'problem': give exactly one of 'problem' or 'messages'")
    if record.get("task") not in (None, "verifiable", "open"):
        raise DataError(f"{where}: field 'task': must be 'verifiable' or 'open', got {record['task']!r}")
    if record.get("task") == "verifiable" and record.get("answer") is None:
        raise DataError(f"{where}: field 'answer': missing, but task is 'verifiable'")
    for i, message in enumerate(record.get("messages") or []):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}: field 'messages[{i}]': expected {{'role': system|user|assistant, 'content': ...}}")
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
        if not isinstance(item, str):
            raise DataError(f"{where}: field 'images[{i}]': expected a path string, got {type(item).__name__}")
        image_path = Path(item) if os.path.isabs(item) else root / item
        if check_images:
            try:
                with Image.open(image_path) as im:
                    im.verify()  # reads the whole file: a truncated or corrupt image fails here, not mid-training
            except FileNotFoundError:
                raise DataError(f"{where}: field 'images[{i}]': no such file {image_path}") from None
            except Exception as err:  # PIL raises many types for corrupt data; all mean "unreadable"
                raise DataError(f"{where}: field 'images[{i}]': unreadable image {image_path} ({err})") from None
        images.append(str(image_path))
    n_placeholders = sum(
        1 for m in record.get("messages") or [] if isinstance(m.get("content"), list)
        for part in m["content"] if isinstance(part, dict) and part.get("type") == "image"
    )
    if record.get("messages") is not None and n_placeholders != len(images):
        raise DataError(f"{where}: field 'images': {len(images)} image(s) but {n_placeholders} image part(s) in messages")
    answer = record.get("answer")
    return Example(
        id=str(record["id"]), problem=record.get("problem"), messages=record.get("messages"), images=images,
        answer=None if answer is None else str(answer), choices=record.get("choices"), task=record.get("task"),
        constraints=record.get("constraints") or [], reference=record.get("reference"),
    )


def iterate_batches(examples: list[Example], batch_size: int, *, seed: int, start: int = 0) -> Iterator[list[Example]]:
    """Endless shuffled batches; epoch e uses permutation seed+e, so position `start` (in batches) can be resumed."""
    per_epoch = len(examples) // batch_size
    if per_epoch == 0:
        raise ValueError(f"data: {len(examples)} examples cannot fill one batch of {batch_size}")
    position = start
    while True:
        epoch, offset = divmod(position, per_epoch)
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        yield [examples[i] for i in order[offset * batch_size:(offset + 1) * batch_size]]
        position += 1


# ---------------------------------------------------------------------------------------------------------------
# Preference pairs (the reward-model stage's data)
# ---------------------------------------------------------------------------------------------------------------

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


def load_preference_jsonl(path: str | os.PathLike, *, aspects: Sequence[str] | None = None,
                          check_images: bool = True) -> list[PreferencePair]:
    """Read and validate preference pairs; raise `DataError("file:line: field 'x': ...")` on the first bad record."""
    path = Path(path)
    pairs, seen = [], set()
    for where, record in read_jsonl(path):
        pair = _parse_pair(record, where, path.parent, aspects, check_images)
        if pair.id in seen:
            raise DataError(f"{where}: field 'id': duplicate id {pair.id!r}")
        seen.add(pair.id)
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: no records")
    return pairs


def _parse_pair(record: dict, where: str, root: Path, aspects: Sequence[str] | None, check_images: bool) -> PreferencePair:
    unknown = set(record) - set(_PAIR_FIELDS)
    if unknown:
        raise DataError(f"{where}: unknown field(s) {sorted(unknown)}; expected some of {sorted(_PAIR_FIELDS)}")
    for key in ("id", "chosen", "rejected"):
        if key not in record:
            raise DataError(f"{where}: field '{key}': missing")
    for key, value in record.items():
        if not isinstance(value, _PAIR_FIELDS[key]) or isinstance(value, bool):
            names = "/".join(t.__name__ for t in _PAIR_FIELDS[key])
            raise DataError(f"{where}: field '{key}': expected {names}, got {type(value).__name__}")
    if ("prompt" in record) == ("messages" in record):
        raise DataError(f"{where}: field 'prompt': give exactly one of 'prompt' or 'messages'")
    messages = record.get("messages")
    if messages is not None and (not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user"):
        raise DataError(f"{where}: field 'messages': must end with a user turn (the responses answer it)")
    for key in ("chosen", "rejected"):
        if any(t in record[key] for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>")):
            raise DataError(f"{where}: field '{key}': contains a vision placeholder token; images go in 'images'")
    if record["chosen"] == record["rejected"]:
        raise DataError(f"{where}: field 'rejected': identical to 'chosen', the pair carries no preference")
    if "aspect" in record and aspects is not None and record["aspect"] not in aspects:
        raise DataError(f"{where}: field 'aspect': {record['aspect']!r} is not one of the model's aspects {list(aspects)}")
    for key in ("chosen_ratings", "rejected_ratings"):
        for name, value in record.get(key, {}).items():
            if aspects is not None and name not in aspects:
                raise DataError(f"{where}: field '{key}.{name}': not one of the model's aspects {list(aspects)}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise DataError(f"{where}: field '{key}.{name}': expected a finite number, got {value!r}")
    prompt = {"id": record["id"], "images": record.get("images", [])}
    prompt.update({"problem": record["prompt"]} if "prompt" in record else {"messages": messages})
    example = parse_record(prompt, where, root, check_images, lambda constraint: None)
    return PreferencePair(
        id=example.id, example=example, chosen=record["chosen"], rejected=record["rejected"],
        aspect=record.get("aspect"), chosen_ratings={k: float(v) for k, v in record.get("chosen_ratings", {}).items()},
        rejected_ratings={k: float(v) for k, v in record.get("rejected_ratings", {}).items()},
    )


# ---------------------------------------------------------------------------------------------------------------
# Prompt building
# ---------------------------------------------------------------------------------------------------------------

def build_messages(example: Example, answer_format: str = "think_answer") -> list[dict[str, Any]]:
    """Chat turns for `example`, the answer-format instruction appended to the last user turn."""
    if answer_format not in FORMAT_INSTRUCTIONS:
        raise ValueError(f"answer_format: unknown {answer_format!r}; expected one of {list(FORMAT_INSTRUCTIONS)}")
    instruction = FORMAT_INSTRUCTIONS[answer_format]
    if example.messages is not None:
        messages = [dict(m) for m in example.messages]
        last = messages[-1]
        if isinstance(last["content"], str):
            last["content"] = f"{last['content']} {instruction}"
        else:
            last["content"] = list(last["content"]) + [{"type": "text", "text": f" {instruction}"}]
        return messages
    content = [{"type": "image"} for _ in example.images]
    content.append({"type": "text", "text": f"{example.problem} {instruction}"})
    return [{"role": "user", "content": content}]


def load_images(example: Example) -> list[Image.Image]:
    return [im if isinstance(im, Image.Image) else Image.open(im).convert("RGB") for im in example.images]


def encode_prompts(processor, examples: list[Example], answer_format: str = "think_answer"):
    """One left-padded batch: input_ids, attention_mask, mm_token_type_ids, and pixel_values/image_grid_thw if any."""
    texts = [processor.apply_chat_template(build_messages(ex, answer_format), add_generation_prompt=True, tokenize=False)
             for ex in examples]
    images = [im for ex in examples for im in load_images(ex)]
    processor.tokenizer.padding_side = "left"  # the sampler appends new tokens on the right of every row
    return processor(text=texts, images=images or None, padding=True, return_tensors="pt")
