"""Built-in synthetic visual tasks: a toy world of coloured shapes, digits and sums drawn with PIL.

    examples = synthetic_examples(64, seed=0, kinds=("count", "colour"))      # list[data.Example]
    pairs = synthetic_pairs(64, seed=0, kinds=("colour", "describe"))          # list[data.PreferencePair]

Every task is deterministic for a seed (the same seed gives the same examples and pixels). Kinds: counting shapes,
reading a number, adding two numbers, multiple-choice colour, the colour of one shape, and open-ended descriptions
(with a `reference` listing what was drawn). `TASK_VOCABULARY` is everything the prompts and answers say: the tiny
tokenizer (model.py) is trained on it.

Synthetic preference pairs (for the reward-model stage): a correct, well-formatted answer beats a wrong one
("correctness") or an unformatted one ("format"); a description of the shapes drawn beats one whose every object
has a colour absent from the image, and half the time another shape ("faithfulness").
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from PIL import Image, ImageDraw

from harmo_min.data import FORMAT_INSTRUCTIONS, Example, PreferencePair

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
TASK_KINDS = ("count", "digits", "arithmetic", "choice", "colour", "describe")

# Words the synthetic prompts and answers use; the tiny tokenizer is trained on them (model.py).
TASK_VOCABULARY = (
    [f"How many {s}s are in the image?" for s in SHAPES]
    + ["What number is written in the image?", "What is the sum of the two numbers in the image?",
       "What colour is the shape?", "What colour is the shape in the image? Options:", "Describe the image.",
       "Answer in at most 20 words.", "Answer with the option letter.", "The image shows a", "and a", "on white.",
       "Reply with the answer only.", "(A) (B) (C) (D) A B C D", "The answer is", "\\boxed{}"]
    + list(FORMAT_INSTRUCTIONS.values())
    + [f"{c} {s}" for c in COLOURS for s in SHAPES] + [f"{c}" for c in COLOURS] + [f"{s}s" for s in SHAPES]
)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _scatter(rng: random.Random, n: int, size: int, cell: int) -> list[tuple[int, int, int, int]]:
    # Non-overlapping cells of a grid, so every shape stays countable.
    per_row = size // cell
    cells = rng.sample(range(per_row * per_row), n)
    pad = cell // 6
    return [((c % per_row) * cell + pad, (c // per_row) * cell + pad,
             (c % per_row + 1) * cell - pad, (c // per_row + 1) * cell - pad) for c in cells]


def _canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    return image, ImageDraw.Draw(image)


def make_example(kind: str, rng: random.Random, index: int, *, size: int = 112) -> Example:
    """One synthetic example of `kind` (one of TASK_KINDS), drawn from `rng`."""
    uid = f"{kind}-{index}"
    if kind == "count":
        shape, n = rng.choice(SHAPES), rng.randint(1, 5)
        image, draw = _canvas(size)
        for box in _scatter(rng, n, size, size // 3):
            _draw_shape(draw, shape, box, rng.choice(list(COLOURS.values())))
        return Example(uid, problem=f"How many {shape}s are in the image?", images=[image], answer=str(n))
    if kind in ("digits", "arithmetic"):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        image, draw = _canvas(size)
        text = f"{a}" if kind == "digits" else f"{a}  {b}"
        draw.text((size // 4, size // 3), text, fill=(0, 0, 0), font_size=size // 3)
        if kind == "digits":
            return Example(uid, problem="What number is written in the image?", images=[image], answer=str(a))
        return Example(uid, problem="What is the sum of the two numbers in the image?", images=[image], answer=str(a + b))
    if kind in ("choice", "colour"):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        image, draw = _canvas(size)
        _draw_shape(draw, shape, (size // 8, size // 8, size - size // 8, size - size // 8), COLOURS[colour])
        if kind == "colour":
            return Example(uid, problem="What colour is the shape?", images=[image], answer=colour)
        options = list(COLOURS)
        rng.shuffle(options)
        letters = "ABCD"
        listed = " ".join(f"({letters[i]}) {o}" for i, o in enumerate(options))
        return Example(
            uid, problem=f"What colour is the shape in the image? Options: {listed}", images=[image],
            answer=letters[options.index(colour)], choices=options,
            constraints=[{"kind": "answer_is_choice_letter"}],
        )
    if kind == "describe":
        n = rng.randint(1, 3)
        image, draw = _canvas(size)
        drawn = []
        for box in _scatter(rng, n, size, size // 2):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            _draw_shape(draw, shape, box, COLOURS[colour])
            drawn.append(f"a {colour} {shape}")
        reference = "The image shows " + " and ".join(drawn) + " on white."
        return Example(uid, problem="Describe the image.", images=[image], reference=reference,
                       constraints=[{"kind": "max_words", "value": 20}])
    raise ValueError(f"unknown synthetic task kind {kind!r}; expected one of {TASK_KINDS}")


def synthetic_examples(n: int, *, seed: int = 0, kinds: tuple[str, ...] = TASK_KINDS, size: int = 112) -> list[Example]:
    """`n` synthetic examples cycling through `kinds`; the same seed gives the same examples and pixels."""
    unknown = [k for k in kinds if k not in TASK_KINDS]
    if unknown:
        raise ValueError(f"data.kinds: unknown synthetic task kind(s) {unknown}; expected some of {list(TASK_KINDS)}")
    rng = random.Random(seed)
    return [make_example(kinds[i % len(kinds)], rng, i, size=size) for i in range(n)]


# Wrong answers stay inside each task's range, so no pair can be told apart by an out-of-range number alone.
_ANSWER_RANGES = {"count": [str(i) for i in range(1, 6)], "digits": [str(i) for i in range(10)],
                  "arithmetic": [str(i) for i in range(19)], "colour": list(COLOURS), "choice": list("ABCD")}
SYNTHETIC_ASPECTS = ("correctness", "format", "faithfulness")


def format_answer(text: str, answer_format: str | None) -> str:
    """A response in the requested format, with a fixed reasoning stub (pairs differ only where they should)."""
    if answer_format == "think_answer":
        return f"<think>The image shows the answer.</think><answer>{text}</answer>"
    if answer_format == "boxed":
        return f"The answer is \\boxed{{{text}}}."
    return text


def _misdescribe(reference: str, rng: random.Random) -> str:
    # Every drawn "a <colour> <shape>" gets a colour drawn nowhere in the image, and half the time another shape:
    # the description names only absent things. Changing one object of three is a subtler hallucination that the
    # tiny model learns only on some seeds in a minute (faithfulness 0.66-0.95 at 600 steps): not a reliable demo.
    mentions = re.findall(r"a (\w+) (\w+)", reference)
    absent = [c for c in COLOURS if c not in {c for c, _ in mentions}]
    wrong = [(rng.choice(absent), rng.choice([t for t in SHAPES if t != s]) if rng.random() < 0.5 else s)
             for _, s in mentions]
    return "The image shows " + " and ".join(f"a {c} {s}" for c, s in wrong) + " on white."


def synthetic_pairs(n: int, *, seed: int = 0, kinds: Sequence[str] = ("colour", "describe"),
                    answer_format: str | None = "think_answer") -> list[PreferencePair]:
    """`n` preference pairs over `data.synthetic_examples(n, seed, kinds)`; deterministic for a seed.

    Verifiable kinds: the correct formatted answer beats a wrong formatted one ("correctness") or, half of the
    time when the format has tags, the correct answer without them ("format"). "describe": the reference beats a
    description naming colours absent from the image ("faithfulness"). Both sides of a pair use the same format.
    """
    rng = random.Random(seed + 1)  # the examples use `seed`; the pair choices must not replay the same stream
    pairs = []
    for ex in synthetic_examples(n, seed=seed, kinds=tuple(kinds)):
        if ex.reference is not None:
            chosen, rejected = format_answer(ex.reference, answer_format), format_answer(_misdescribe(ex.reference, rng), answer_format)
            aspect = "faithfulness"
        elif answer_format in ("think_answer", "boxed") and rng.random() < 0.5:
            chosen, rejected, aspect = format_answer(ex.answer, answer_format), f"The answer is {ex.answer}", "format"
        else:
            wrong = rng.choice([a for a in _ANSWER_RANGES[ex.id.split("-")[0]] if a != ex.answer])
            chosen, rejected, aspect = format_answer(ex.answer, answer_format), format_answer(wrong, answer_format), "correctness"
        pairs.append(PreferencePair(id=ex.id, example=ex, chosen=chosen, rejected=rejected, aspect=aspect))
    return pairs
