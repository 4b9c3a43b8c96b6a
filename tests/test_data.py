"""Examples, JSONL validation (errors name file:line:field), synthetic tasks, prompt encoding."""

import json

import numpy as np
import pytest
from PIL import Image

from harmo_min.data import DataError, Example, build_messages, encode_prompts, iterate_batches, load_jsonl

from harmo_min.synthetic import synthetic_examples


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(path)
    return path


def _write(tmp_path, records):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_valid_file_loads_with_relative_images_and_inferred_task(tmp_path, image_file):
    path = _write(tmp_path, [
        {"id": 1, "problem": "How many?", "images": ["img.png"], "answer": 3},
        {"id": "b", "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
         "images": [str(image_file)], "constraints": [{"kind": "max_words", "value": 10}]},
    ])
    a, b = load_jsonl(path)
    assert (a.id, a.answer, a.task, a.images) == ("1", "3", "verifiable", [str(image_file)])
    assert (b.task, b.answer, b.constraints) == ("open", None, [{"kind": "max_words", "value": 10}])


@pytest.mark.parametrize("record,line,field", [
    ({"problem": "x"}, 2, "'id'"),
    ({"id": "x", "problem": "p", "answer": ["3"]}, 2, "'answer'"),
    ({"id": "x", "problem": "p", "images": ["missing.png"]}, 2, "'images[0]'"),
    ({"id": "x", "problem": "p", "images": [7]}, 2, "'images[0]'"),
    ({"id": "x", "problem": "p", "task": "verifiable"}, 2, "'answer'"),
    ({"id": "x", "problem": "p", "task": "maybe"}, 2, "'task'"),
    ({"id": "x", "problem": "p", "choices": ["a", 2]}, 2, "'choices[1]'"),
    ({"id": "x", "problem": "p", "constraints": [{"kind": "no_such_kind"}]}, 2, "'constraints[0]'"),
    ({"id": "x", "problem": "p", "messages": []}, 2, "'problem'"),
    ({"id": "x", "messages": [{"role": "robot", "content": "hi"}]}, 2, "'messages[0]'"),
    ({"id": "x", "messages": [{"role": "user", "content": "hi"}], "images": ["img.png"]}, 2, "'images'"),
    ({"id": "ok", "problem": "p"}, 2, "'id'"),  # duplicate of line 1
])
def test_bad_record_error_names_file_line_and_field(tmp_path, image_file, record, line, field):
    path = _write(tmp_path, [{"id": "ok", "problem": "p"}, record])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert f"{path}:{line}:" in str(err.value) and field in str(err.value)


def test_corrupt_image_and_bad_json_are_reported(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    path = _write(tmp_path, [{"id": "a", "problem": "p", "images": ["bad.png"]}])
    with pytest.raises(DataError, match=r"data.jsonl:1: field 'images\[0\]': unreadable image"):
        load_jsonl(path)
    path = _write(tmp_path, ['{"id": "a", "problem": '])
    with pytest.raises(DataError, match=r"data.jsonl:1: not valid JSON"):
        load_jsonl(path)
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_synthetic_tasks_are_deterministic_by_seed():
    a, b, c = (synthetic_examples(12, seed=s) for s in (3, 3, 4))
    assert [(e.id, e.problem, e.answer, e.choices, e.constraints) for e in a] == \
           [(e.id, e.problem, e.answer, e.choices, e.constraints) for e in b]
    assert all(np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0])) for x, y in zip(a, b))
    assert any(not np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0])) for x, y in zip(a, c))


def test_synthetic_tasks_cover_verifiable_open_choice_and_constraints():
    examples = synthetic_examples(12, seed=0)
    assert {e.task for e in examples} == {"verifiable", "open"}
    choice = next(e for e in examples if e.choices)
    assert choice.answer in "ABCD" and len(choice.choices) == 4
    assert any(e.constraints for e in examples)
    described = next(e for e in examples if e.task == "open")
    assert described.answer is None and described.reference.startswith("The image shows")
    count = next(e for e in examples if e.id.startswith("count"))
    assert 1 <= int(count.answer) <= 5


def _blobs(image):
    """Number of 4-connected non-white regions (a tiny flood fill; shapes are drawn on a grid, never touching)."""
    a = (np.asarray(image).min(-1) < 200)
    seen, count = np.zeros_like(a), 0
    for y, x in zip(*np.nonzero(a)):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        while stack:
            i, j = stack.pop()
            if 0 <= i < a.shape[0] and 0 <= j < a.shape[1] and a[i, j] and not seen[i, j]:
                seen[i, j] = True
                stack += [(i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)]
    return count


def test_count_answer_matches_the_drawing():
    for ex in synthetic_examples(30, seed=1, kinds=("count",)):
        assert _blobs(ex.images[0]) == int(ex.answer), ex.id


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="data.kinds"):
        synthetic_examples(2, kinds=("count", "juggle"))


def test_build_messages_appends_the_format_instruction():
    ex = Example("x", problem="How many circles are in the image?", images=["a.png"], answer="2")
    (turn,) = build_messages(ex, "think_answer")
    assert turn["content"][0] == {"type": "image"}
    assert turn["content"][1]["text"].endswith("<answer> </answer>.")
    assert "\\boxed{}" in build_messages(ex, "boxed")[0]["content"][1]["text"]
    with pytest.raises(ValueError, match="answer_format"):
        build_messages(ex, "xml")


def test_encode_prompts_is_left_padded_with_mm_token_types(tiny):
    _, processor = tiny
    examples = synthetic_examples(3, seed=0)
    examples[0].images = [examples[0].images[0].resize((56, 56))]
    batch = encode_prompts(processor, examples)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert set(batch) >= {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][0, 0]
    assert torch_equal(batch["mm_token_type_ids"] == 1, batch["input_ids"] == image_id)
    assert int((batch["input_ids"] == image_id).sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // 4


def torch_equal(a, b):
    return bool((a == b).all())


def test_iterate_batches_resumes_at_a_position():
    examples = synthetic_examples(10, seed=0)
    full = iterate_batches(examples, 3, seed=1)
    first = [next(full) for _ in range(5)]
    resumed = iterate_batches(examples, 3, seed=1, start=3)
    assert [e.id for e in next(resumed)] == [e.id for e in first[3]]
