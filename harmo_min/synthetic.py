"""The toy visual world: coloured shapes, digits and sums drawn with PIL; demonstrations; preference pairs.

    examples = synthetic_examples(64, seed=0, kinds=("count", "describe"))      # list[data.Example]
    demos = synthetic_demonstrations(64, seed=0, kinds=("count", "choice"))     # list[(Example, response)]
    pairs = synthetic_pairs(64, seed=0, kinds=("colour", "describe"))            # list[data.PreferencePair]

**Tasks** (`TASK_KINDS`). Verifiable, checked by the rule verifier: `count` (how many circles / squares /
triangles: 1-4 shapes of one kind, random colours, in the cells of a 2 x 2 grid), `digits` (read one bold digit,
0-4), `arithmetic` (add two of them), `choice` (the colour of a shape, as an option letter (A)-(D) listed in one
fixed order; constraint `answer_is_choice_letter`), `colour` (the colour word). Open, scored by a reward model:
`describe` (one shape; constraint `max_words` 7, said in the prompt). Every example carries a `reference`: the
notes a careful reader takes from the image, one item at a time (`count`: every cell in reading order, "red
circle, empty, empty, blue circle"; `arithmetic`: "3 + 4"; `choice` / `colour`: "blue square"), or for `describe`
the full description "The image shows a red circle on white.".

**Demonstrations** (the supervised warm-up's data) answer the way an instruct model does, in one of three `STYLES`:

    reason       <think>{notes}</think><answer>{answer}</answer>   the notes do the work (the cells named before
                                                                   the count, each digit before the sum)
    direct       <think></think><answer>{answer}</answer>          a guess (short, right format: it can win a group)
    unformatted  {answer}                                          no tags: the format reward's job

plus two instruction slips: a multiple-choice item answered with the option's text ("blue": correct, but not a
letter), the verbose description (8 words) instead of the brief one ("a red circle"). Each share is a warm-up setting.

**Preference pairs** (the reward-model stage's data): responses written like `reason` demonstrations, so the
reward model learns on text that looks like the policy's. "correctness": the right answer beats a wrong one whose
notes misread the image and reason consistently from there (only the image tells them apart); "format" (half of
the verifiable items when the format has tags): the right answer in tags beats "The answer is {answer}";
"faithfulness" (half of `describe`): the description, brief or verbose, beats one naming a shape that was not
drawn (another colour, shape, or both); "helpfulness": it beats one that leaves out the colour or the shape, or
answers another task ("a square", "3"). Except for "format", both sides share the answer format and style.

`TASK_VOCABULARY` is everything prompts and responses say: the tiny tokenizer (model.py) is trained on it, so
colour and shape words are single tokens. Every draw (examples, pixels, demonstrations, pairs) is deterministic for
a seed. Left out: overlapping shapes, real fonts, more than one image per item; why the world is this small is in
benchmarks/RESULTS.md ("What did not work on the way").
"""

import random
import re
from typing import Sequence

from PIL import Image, ImageDraw

from harmo_min.data import FORMAT_INSTRUCTIONS, Example, PreferencePair

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
TASK_KINDS = ("count", "digits", "arithmetic", "choice", "colour", "describe")
STYLES = ("reason", "direct", "unformatted")
DIGITS = range(5)  # with 0-9, after 600 warm-up steps the tiny model read both digits of a sum wrong 80 % of the time
DESCRIBE_MAX_WORDS = 7  # the brief description fits (3 words: "a red circle"); the verbose one does not (8)

_OBJECTS = [f"{c} {s}" for c in COLOURS for s in SHAPES]
# Whole phrases, so that byte-pair merges make " red", " circle", " shows" single tokens.
TASK_VOCABULARY = (
    [f"How many {s}s are in the image?" for s in SHAPES]
    + ["What number is written in the image?", "What is the sum of the two numbers in the image?",
       "What colour is the shape?", "What colour is the shape in the image? Options:", "Describe the image.",
       f"Describe the image in at most {DESCRIBE_MAX_WORDS} words.", "Answer with the option letter.",
       "Answer in at most 20 words.", "The image shows a", "and a", "on white.", "Reply with the answer only.",
       "(A) (B) (C) (D) A B C D", "The answer is", "\\boxed{}"]
    + list(FORMAT_INSTRUCTIONS.values())
    + _OBJECTS + list(COLOURS) + [f"{s}s" for s in SHAPES]
    + [f"The image shows a {a} and a {b} on white." for a in _OBJECTS for b in _OBJECTS[::2]]
    + [f"a {a}, a {b}, a {c}" for a, b, c in zip(_OBJECTS, _OBJECTS[4:] + _OBJECTS[:4], _OBJECTS[7:] + _OBJECTS[:7])]
    + [f"{a}, {b}, {c}" for a, b, c in zip(_OBJECTS, _OBJECTS[5:] + _OBJECTS[:5], _OBJECTS[2:] + _OBJECTS[:2])]
    + [f"{a}, empty, {b}, empty" for a in _OBJECTS for b in _OBJECTS[::3]]
    + [f"{a} + {b}" for a in range(10) for b in range(10)] + [" ".join(str(i) for i in range(20))]
)


def make_example(kind: str, rng: random.Random, index: int, *, size: int = 112) -> Example:
    """One synthetic example of `kind` (one of TASK_KINDS), drawn from `rng`; `reference` holds the notes."""
    uid = f"{kind}-{index}"
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if kind == "count":
        shape, n = rng.choice(SHAPES), rng.randint(1, 4)
        # The cells of a 2 x 2 grid in reading order, padded so that shapes in neighbouring cells never touch.
        cell, named = size // 2, ["empty"] * 4
        pad = cell // 6
        for i in sorted(rng.sample(range(4), n)):
            colour = rng.choice(list(COLOURS))
            box = (i % 2 * cell + pad, i // 2 * cell + pad, (i % 2 + 1) * cell - pad, (i // 2 + 1) * cell - pad)
            _draw_shape(draw, shape, box, COLOURS[colour])
            named[i] = f"{colour} {shape}"
        return Example(uid, problem=f"How many {shape}s are in the image?", images=[image], answer=str(n),
                       reference=", ".join(named))
    if kind in ("digits", "arithmetic"):
        a, b = rng.choice(DIGITS), rng.choice(DIGITS)
        # Large and bold, one digit per half of the image: the tiny vision tower does not learn to read thin glyphs.
        for x, digit in ((0, a),) if kind == "digits" else ((0, a), (size // 2, b)):
            draw.text((x + size // 10, size // 5), str(digit), fill=(0, 0, 0), font_size=size // 2,
                      stroke_width=size // 28, stroke_fill=(0, 0, 0))
        if kind == "digits":
            return Example(uid, problem="What number is written in the image?", images=[image], answer=str(a),
                           reference=str(a))
        return Example(uid, problem="What is the sum of the two numbers in the image?", images=[image],
                       answer=str(a + b), reference=f"{a} + {b}")
    if kind in ("choice", "colour", "describe"):
        # One shape: with two or three, the tiny reward model could not tell near misses from faithful descriptions.
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        _draw_shape(draw, shape, (size // 8, size // 8, size - size // 8, size - size // 8), COLOURS[colour])
        if kind == "colour":
            return Example(uid, problem="What colour is the shape?", images=[image], answer=colour,
                           reference=f"{colour} {shape}")
        if kind == "describe":
            reference = f"The image shows a {colour} {shape} on white."
            return Example(uid, problem=f"Describe the image in at most {DESCRIBE_MAX_WORDS} words.", images=[image],
                           reference=reference, constraints=[{"kind": "max_words", "value": DESCRIBE_MAX_WORDS}])
        # Options in one fixed order: shuffled, the letter is a lookup in the prompt the tiny model does not learn.
        options = list(COLOURS)
        listed = " ".join(f"({'ABCD'[i]}) {o}" for i, o in enumerate(options))
        return Example(
            uid, problem=f"What colour is the shape in the image? Options: {listed} Answer with the option letter.",
            images=[image], answer="ABCD"[options.index(colour)], choices=options,
            constraints=[{"kind": "answer_is_choice_letter"}], reference=f"{colour} {shape}",
        )
    raise ValueError(f"unknown synthetic task kind {kind!r}; expected one of {TASK_KINDS}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def synthetic_examples(n: int, *, seed: int = 0, kinds: tuple[str, ...] = TASK_KINDS, size: int = 112) -> list[Example]:
    """`n` synthetic examples cycling through `kinds`."""
    unknown = [k for k in kinds if k not in TASK_KINDS]
    if unknown:
        raise ValueError(f"data.kinds: unknown synthetic task kind(s) {unknown}; expected some of {list(TASK_KINDS)}")
    if not kinds:
        raise ValueError(f"data.kinds: no synthetic task kinds; expected some of {list(TASK_KINDS)}")
    rng = random.Random(seed)
    return [make_example(kinds[i % len(kinds)], rng, i, size=size) for i in range(n)]


def kind_of(example: Example) -> str:
    """The task kind of a synthetic example (its id is "<kind>-<index>")."""
    kind = example.id.split("-")[0]
    if kind not in TASK_KINDS:
        raise ValueError(f"example {example.id!r} is not a synthetic example (ids are <kind>-<index>)")
    return kind


def described_objects(text: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a description names, in order: "a red circle, a blue square" -> 2 objects."""
    return re.findall(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b", text)


def notes(example: Example) -> str:
    """The reasoning of a `reason` demonstration: what the image shows, one item at a time."""
    if kind_of(example) == "describe":
        return ", ".join(f"{c} {s}" for c, s in described_objects(example.reference))
    return example.reference


def final_answer(example: Example, *, choice_text: bool = False, verbose: bool = False) -> str:
    """The answer block's content; `choice_text` and `verbose` are the two instruction slips."""
    if kind_of(example) == "describe":
        brief = ", ".join(f"a {c} {s}" for c, s in described_objects(example.reference))
        return example.reference if verbose else brief
    if choice_text and example.choices:
        return example.choices["ABCD".index(example.answer)]
    return example.answer


def format_answer(text: str, answer_format: str | None, reasoning: str = "") -> str:
    """A response in `answer_format` (think_answer: with `reasoning` as its notes)."""
    if answer_format == "think_answer":
        return f"<think>{reasoning}</think><answer>{text}</answer>"
    if answer_format == "boxed":
        return f"{reasoning} The answer is \\boxed{{{text}}}.".strip()
    return text


def synthetic_demonstrations(n: int, *, seed: int = 0, kinds: Sequence[str] = TASK_KINDS, size: int = 112,
                             styles: dict[str, float] | None = None, choice_text: float = 0.0,
                             verbose: float = 0.0) -> list[tuple[Example, str]]:
    """`n` (example, response) pairs over `synthetic_examples(n, seed, kinds)`. `styles`: each style's share
    (normalised; default all `reason`); `choice_text`, `verbose`: the chances of the two slips where they apply."""
    styles = styles or {"reason": 1.0}
    unknown = [s for s in styles if s not in STYLES]
    if unknown or any(not isinstance(w, (int, float)) or w < 0 for w in styles.values()) or sum(styles.values()) <= 0:
        raise ValueError(f"data.styles: need non-negative shares of {list(STYLES)} with a positive sum, got {styles}")
    rng = random.Random(seed + 2)  # the examples use `seed`, the pairs seed + 1: three independent streams
    demos = []
    for ex in synthetic_examples(n, seed=seed, kinds=tuple(kinds), size=size):
        style = rng.choices(list(styles), list(styles.values()))[0]
        answer = final_answer(ex, choice_text=rng.random() < choice_text, verbose=rng.random() < verbose)
        reasoning = notes(ex) if style == "reason" else ""
        demos.append((ex, format_answer(answer, None if style == "unformatted" else "think_answer", reasoning)))
    return demos


def _misread(example: Example, rng: random.Random) -> tuple[str, str]:
    # (notes, answer) of a reader who got the image wrong but reasoned consistently from there.
    kind = kind_of(example)
    if kind == "count":
        cells = example.reference.split(", ")
        shape = next(c for c in cells if c != "empty").split()[1]
        n = int(example.answer)
        wrong = rng.choice([k for k in range(1, 5) if k != n])
        # Fill empty cells (or empty filled ones) until `wrong` shapes are left.
        for i in rng.sample([i for i, c in enumerate(cells) if (c == "empty") == (wrong > n)], abs(wrong - n)):
            cells[i] = f"{rng.choice(list(COLOURS))} {shape}" if wrong > n else "empty"
        return ", ".join(cells), str(wrong)
    if kind == "arithmetic":
        a, b = (int(x) for x in example.reference.split(" + "))
        b2 = rng.choice([d for d in DIGITS if d != b])
        return (f"{a} + {b2}", str(a + b2)) if rng.random() < 0.5 else (f"{b2} + {b}", str(b2 + b))
    if kind in ("choice", "colour"):
        colour, shape = example.reference.split()
        other = rng.choice([c for c in COLOURS if c != colour])
        answer = other if kind == "colour" else "ABCD"[example.choices.index(other)]
        return f"{other} {shape}", answer
    assert kind == "digits", kind  # open items are misdescribed, not misread
    # Another digit of the task's range, so that no pair can be told apart by an out-of-range number alone.
    wrong = rng.choice([str(d) for d in DIGITS if str(d) != example.answer])
    return wrong, wrong


def _misdescribe(reference: str, rng: random.Random) -> str:
    # Each drawn object becomes one not drawn: another colour, shape, or both, a third of the time each (with the
    # colour always changed, the reward model checked colours only and GRPO called a red circle "a red square").
    wrong = []
    for colour, shape in described_objects(reference):
        change = rng.choice(("colour", "shape", "both"))
        if change != "shape":
            colour = rng.choice([c for c in COLOURS if c != colour])
        if change != "colour":
            shape = rng.choice([t for t in SHAPES if t != shape])
        wrong.append(f"a {colour} {shape}")
    return "The image shows " + " and ".join(wrong) + " on white."


def synthetic_pairs(n: int, *, seed: int = 0, kinds: Sequence[str] = ("colour", "describe"),
                    answer_format: str | None = "think_answer") -> list[PreferencePair]:
    """`n` preference pairs over `synthetic_examples(n, seed, kinds)`, labelled with their aspect."""
    rng = random.Random(seed + 1)  # the examples use `seed`: the pair choices must not replay the same stream
    pairs = []
    for ex in synthetic_examples(n, seed=seed, kinds=tuple(kinds)):
        verbose = ex.task == "open" and rng.random() < 0.5  # the description style of both sides
        chosen = format_answer(final_answer(ex, verbose=verbose), answer_format, notes(ex))
        if ex.task == "open":
            if rng.random() < 0.5:
                wrong = Example(ex.id, problem=ex.problem, images=ex.images, reference=_misdescribe(ex.reference, rng))
                rejected = format_answer(final_answer(wrong, verbose=verbose), answer_format, notes(wrong))
                aspect = "faithfulness"
            else:
                # Not wrong, but not a description: without such pairs the reward model scored "<answer>a</answer>"
                # and "The image shows a square" like faithful descriptions, and GRPO found them.
                (colour, shape), = described_objects(ex.reference)
                unhelpful = rng.choice([f"a {shape}", f"a {colour}", f"The image shows a {shape} on white.", "a",
                                        "The image shows", str(rng.randint(1, 4)), rng.choice("ABCD"), "empty"])
                rejected, aspect = format_answer(unhelpful, answer_format, notes(ex)), "helpfulness"
        elif answer_format in ("think_answer", "boxed") and rng.random() < 0.5:
            rejected, aspect = f"The answer is {ex.answer}", "format"
        else:
            # Consistent notes on both sides: with "right notes, wrong answer" pairs as well, the reward model
            # learned the text-only shortcut (answer agrees with notes) and stayed at chance on the rest.
            wrong_notes, wrong = _misread(ex, rng)
            rejected, aspect = format_answer(wrong, answer_format, wrong_notes), "correctness"
        pairs.append(PreferencePair(id=ex.id, example=ex, chosen=chosen, rejected=rejected, aspect=aspect))
    return pairs
