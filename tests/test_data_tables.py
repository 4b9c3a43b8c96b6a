"""Training data in the layouts people download (issue #15): parquet files and shard folders, arrow files and
`datasets.save_to_disk` folders, with images as embedded bytes, `{bytes, path}` structs or paths; the column
mapping; the gold-answer rule; errors naming file, row and field; `python -m harmo_min.data convert`.

Every dataset here is written by the real writers (pyarrow, and `datasets` for the hub's Image feature and
save_to_disk) with generated pictures, and read back exactly.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from harmo_min import data
from harmo_min.data import DataError, EncodedImage, encode_prompts, gold_answer, load_examples, load_images, load_jsonl

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature in arrow


def picture(seed: int, size=(40, 30)) -> Image.Image:
    """A small picture unique to `seed`: a background and a rectangle, both coloured by the seed."""
    im = Image.new("RGB", size, ((seed * 50) % 256, (seed * 90) % 256, (seed * 130) % 256))
    ImageDraw.Draw(im).rectangle((seed % 10, 3, seed % 10 + 12, 20), fill=(255 - seed, seed, 128))
    return im


def encoded(seed: int, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    picture(seed, **kw).save(buf, fmt)
    return buf.getvalue()


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def same_pixels(a, b) -> bool:
    return a.size == b.size and np.array_equal(pixels(a), pixels(b))


def write_parquet(path: Path, columns: dict, types: dict | None = None) -> Path:
    types = types or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, type=types.get(k)) for k, v in columns.items()}), path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# One layout per common dataset, parsed exactly
# ---------------------------------------------------------------------------------------------------------------

def test_geometry3k_as_the_hub_ships_it_images_as_structs_written_by_datasets(tmp_path):
    # hiyouga/geometry3k (EasyR1): images = list of Image, problem with an <image> placeholder, answer.
    features = datasets.Features({"images": datasets.Sequence(datasets.Image()), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"images": [[picture(1)], [picture(2)]],
                                     "problem": ["<image>Find x.", "<image>Find the area of the triangle."],
                                     "answer": ["4.5", "2 \\sqrt { 221 }"]}, features=features)
    path = tmp_path / "geometry3k" / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    ds.to_parquet(str(path))
    assert pq.read_schema(path).field("images").type.value_type == IMAGE_STRUCT  # the layout under test

    a, b = load_examples(path)
    assert [(e.id, e.problem, e.answer, e.task) for e in (a, b)] == [
        ("0", "Find x.", "4.5", "verifiable"), ("1", "Find the area of the triangle.", "2 \\sqrt { 221 }", "verifiable")]
    assert all(isinstance(im, EncodedImage) for e in (a, b) for im in e.images)  # kept compressed until a batch
    assert a.images[0].name == f"{path}:row 0: field 'images[0]'"
    assert same_pixels(load_images(a)[0], picture(1)) and same_pixels(load_images(b)[0], picture(2))
    # The folder the hub download gives (one split) reads the same.
    assert [e.id for e in load_examples(tmp_path / "geometry3k")] == ["0", "1"]


def test_mmk12_layout_raw_bytes_column_and_boxed_answers(tmp_path):
    # FanqingM/MMK12: id, subject, question, image (one Image), answer; here the image column is plain bytes.
    path = write_parquet(tmp_path / "mmk12.parquet", {
        "id": ["m-1", "m-2", "m-3"], "subject": ["math"] * 3,
        "question": ["What is x?", "Which option?\nA. 1\nB. 2", "Compute the sum."],
        "image": [encoded(3), encoded(4, "JPEG"), encoded(5)],
        "answer": ["\\boxed{\\frac{1}{2}}", "B", "First 2 + 3 = 5.\nThen 5 + 4 = 9.\nSo the answer is 9."],
    })
    one, two, three = load_examples(path)
    assert [(e.id, e.problem, e.answer) for e in (one, two, three)] == [
        ("m-1", "What is x?", "\\frac{1}{2}"), ("m-2", "Which option?\nA. 1\nB. 2", "B"), ("m-3", "Compute the sum.", "9")]
    assert one.images[0].name == f"{path}:row 0: field 'image'"  # a single-image column: no index
    assert same_pixels(load_images(one)[0], picture(3))
    with Image.open(io.BytesIO(encoded(4, "JPEG"))) as jpeg:
        assert same_pixels(load_images(two)[0], jpeg)  # the bytes as they were, decoded once per use


def test_virl39k_layout_image_paths_relative_to_the_file_or_image_root(tmp_path):
    # TIGER-Lab/ViRL39K: qid, question with <image> tags, image = list of paths into images/, answer \boxed{}.
    root = tmp_path / "ViRL39K"
    (root / "images").mkdir(parents=True)
    picture(6).save(root / "images" / "a.png")
    picture(7).save(root / "images" / "b.png")
    columns = {"qid": ["q1", "q2"], "question": ["<image>\nWhich is larger?", "<image><image> Compare them."],
               "image": [["images/a.png"], ["images/a.png", "images/b.png"]], "answer": ["\\boxed{A}", "\\boxed{3}"],
               "category": ["chart", "chart"], "PassRate_7BTrained": [0.5, 0.25]}
    path = write_parquet(root / "39Krelease.parquet", columns)
    q1, q2 = load_examples(path)
    assert [(e.id, e.problem, e.answer) for e in (q1, q2)] == [("q1", "Which is larger?", "A"), ("q2", "Compare them.", "3")]
    assert q2.images == [str(root / "images" / "a.png"), str(root / "images" / "b.png")]
    assert same_pixels(load_images(q2)[1], picture(7))

    moved = write_parquet(tmp_path / "elsewhere" / "39K.parquet", columns)
    with pytest.raises(DataError, match=r"39K.parquet:row 0: field 'image\[0\]': no such file .*elsewhere/images/a.png"):
        load_examples(moved)
    assert load_examples(moved, image_root=root)[1].images[1] == str(root / "images" / "b.png")


def test_mathvista_testmini_parquet_prefers_decoded_image_over_the_path_it_names(tmp_path):
    path = write_parquet(tmp_path / "testmini-00000-of-00001-5ee8f0d9fb53b3a1.parquet", {
        "pid": ["1"], "question": ["How many bars?"], "image": ["images/1.jpg"],
        "decoded_image": [{"bytes": encoded(8), "path": "1.jpg"}], "answer": ["4"],
    }, {"decoded_image": IMAGE_STRUCT})
    (example,) = load_examples(path)
    assert (example.id, example.problem, example.answer) == ("1", "How many bars?", "4")
    assert same_pixels(load_images(example)[0], picture(8))


def test_arrow_files_in_the_stream_and_the_file_format(tmp_path):
    table = pa.table({"problem": ["p0", "p1"], "answer": ["1", "2"],
                      "image": pa.array([{"bytes": encoded(9), "path": None}, {"bytes": encoded(10), "path": None}],
                                        type=IMAGE_STRUCT)})
    stream, feather = tmp_path / "stream.arrow", tmp_path / "file.arrow"
    with pa.ipc.new_stream(str(stream), table.schema) as w:
        w.write_table(table)
    with pa.ipc.new_file(str(feather), table.schema) as w:
        w.write_table(table)
    for path in (stream, feather):
        a, b = load_examples(path)
        assert (a.id, a.problem, b.answer) == ("0", "p0", "2") and same_pixels(load_images(b)[0], picture(10))


# ---------------------------------------------------------------------------------------------------------------
# Folders: hub shards, save_to_disk
# ---------------------------------------------------------------------------------------------------------------

def test_a_folder_of_shards_reads_in_order_and_refuses_mixed_splits_and_missing_shards(tmp_path):
    folder = tmp_path / "hub" / "data"
    for index, rows in enumerate([("a", "b"), ("c",)]):
        write_parquet(folder / f"train-{index:05d}-of-00002.parquet",
                      {"problem": [f"find {r}" for r in rows], "answer": ["1"] * len(rows), "images": [[]] * len(rows)},
                      {"images": pa.list_(IMAGE_STRUCT)})
    assert [(e.id, e.problem) for e in load_examples(tmp_path / "hub")] == [("0", "find a"), ("1", "find b"), ("2", "find c")]
    second = load_examples(tmp_path / "hub")[2]
    assert second.images == [] and second.task == "verifiable"

    write_parquet(folder / "test-00000-of-00001.parquet", {"problem": ["t"], "answer": ["1"], "images": [[]]},
                  {"images": pa.list_(IMAGE_STRUCT)})
    with pytest.raises(DataError, match=r"holds several splits \(test, train\): give one, e.g. .*data/test-\*.parquet"):
        load_examples(tmp_path / "hub")
    assert len(load_examples(f"{folder}/train-*.parquet")) == 3

    (folder / "train-00001-of-00002.parquet").unlink()
    with pytest.raises(DataError, match=r"split 'train' is incomplete: shard\(s\) \[1\] of 2 are missing"):
        load_examples(f"{folder}/train-*.parquet")
    with pytest.raises(DataError, match="no .parquet or .arrow files match"):
        load_examples(f"{folder}/validation-*.parquet")


def test_save_to_disk_folder_with_embedded_and_path_images(tmp_path):
    picture(11).save(tmp_path / "on_disk.png")
    features = datasets.Features({"question": datasets.Value("string"), "solution": datasets.Value("string"),
                                  "image": datasets.Image()})
    ds = datasets.Dataset.from_dict({"question": ["Read the number.", "Count the shapes."],
                                     "solution": ["It reads \\boxed{42}.", "<think>two</think><answer>2</answer>"],
                                     "image": [picture(12), str(tmp_path / "on_disk.png")]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    a, b = load_examples(tmp_path / "saved")  # answer <- solution (no `answer` column), images <- image
    assert [(e.id, e.problem, e.answer) for e in (a, b)] == [("0", "Read the number.", "42"), ("1", "Count the shapes.", "2")]
    assert same_pixels(load_images(a)[0], picture(12)) and same_pixels(load_images(b)[0], picture(11))
    assert isinstance(b.images[0], EncodedImage)  # save_to_disk embedded the file's bytes: no path left to go stale

    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"a DatasetDict saved with save_to_disk, splits \['train', 'test'\]: give one "
                                        r"split's folder, e.g. .*dict/train"):
        load_examples(tmp_path / "dict")
    assert [e.answer for e in load_examples(tmp_path / "dict" / "test")] == ["42", "2"]


# ---------------------------------------------------------------------------------------------------------------
# The column mapping
# ---------------------------------------------------------------------------------------------------------------

def _verl_like(tmp_path) -> Path:
    return write_parquet(tmp_path / "verl.parquet", {
        "uid": ["u1", "u2"], "prompt_text": ["What colour?", "How many?"], "pics": [[encoded(13)], [encoded(14)]],
        "reward_model": [{"style": "rule", "ground_truth": "red"}, {"style": "rule", "ground_truth": "3"}],
    })


def test_field_mapping_overrides_defaults_reaches_into_structs_and_can_drop_fields(tmp_path):
    path = _verl_like(tmp_path)
    fields = {"id": "uid", "problem": "prompt_text", "images": "pics", "answer": "reward_model.ground_truth"}
    a, b = load_examples(path, fields=fields)
    assert [(e.id, e.problem, e.answer, len(e.images)) for e in (a, b)] == [("u1", "What colour?", "red", 1),
                                                                          ("u2", "How many?", "3", 1)]
    assert same_pixels(load_images(b)[0], picture(14))
    opened = load_examples(path, fields={**fields, "answer": None, "images": None})
    assert [(e.task, e.answer, e.images) for e in opened] == [("open", None, [])] * 2


@pytest.mark.parametrize("fields,message", [
    ({"problem": "prompt_text", "images": "pics", "answer": "reward_model.ground_truth", "gold": "x"},
     r"data.fields: unknown field\(s\) \['gold'\]; expected some of \['id', 'problem', 'answer', 'images'\]"),
    ({"problem": "question", "images": "pics", "answer": "reward_model.ground_truth"},
     r"verl.parquet: data.fields.problem: no column 'question'; the columns are \['uid', 'prompt_text', 'pics', "
     r"'reward_model'\]"),
    ({"images": "pics", "answer": "reward_model.ground_truth"},
     r"no column for 'problem' \(looked for problem, question\); the columns are .*: set data.fields.problem"),
    ({"problem": "prompt_text", "answer": "reward_model.ground_truth"},
     r"no column for 'images' \(looked for images, decoded_image, image\).*set data.fields.images \(or null"),
    ({"problem": "prompt_text", "images": "pics", "answer": "reward_model.truth"},
     r"verl.parquet:row 0: field 'reward_model.truth': missing \(no 'truth' in dict\)"),
    ({"problem": None}, r"data.fields.problem: cannot be null"),
    ({"problem": 3}, r"data.fields.problem: expected a column name or null, got 3"),
])
def test_field_mapping_errors_name_the_key_and_the_columns(tmp_path, fields, message):
    with pytest.raises(DataError, match=message):
        load_examples(_verl_like(tmp_path), fields=fields)


def test_field_mapping_is_for_tables_only(tmp_path):
    path = tmp_path / "own.jsonl"
    path.write_text(json.dumps({"id": "a", "problem": "p"}) + "\n")
    with pytest.raises(DataError, match=r"data.fields: maps the columns of parquet/arrow tables; .*own.jsonl is the "
                                        r"project's JSONL"):
        load_examples(path, fields={"problem": "question"})
    assert [e.id for e in load_examples(path, fields={})] == ["a"]


# ---------------------------------------------------------------------------------------------------------------
# The gold-answer rule
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,gold", [
    ("\\boxed{12}", "12"),
    ("$\\boxed{\\frac{3}{4}}$", "\\frac{3}{4}"),
    ("<think>it is seven</think><answer>7</answer>", "7"),
    ("Angle A is 40°.\nAngle B is 60°.\nSo the answer is \\boxed{80^\\circ}.", "80^\\circ"),
    ("First 5 + 7 = 12,\nso the answer is $\\boxed{12}$.", "12"),  # the README's example
    ("The sides are 3 and 4.\nThe answer is 5.", "5"),
    ("Answer: B", "B"),
    ("$x^2 + 1$", "x^2 + 1"),
    ("The Eiffel Tower in Paris, built for the 1889 World's Fair", "The Eiffel Tower in Paris, built for the 1889 World's Fair"),
    (3, "3"),
    (2.5, "2.5"),
])
def test_gold_answer_is_the_verifiers_extraction_or_the_one_line_answer_itself(value, gold):
    assert gold_answer(value, "f:row 0: field 'answer'") == gold


@pytest.mark.parametrize("value,message", [
    ("First 2 + 3 = 5.\nThen we double it.", "no final answer in"),
    ("\\boxed{5", "no final answer in"),
    ("<answer>unclosed", "no final answer in"),
    ("   ", "empty"),
    (None, "missing; every row needs a gold answer"),
    (float("nan"), "expected a finite number"),
    (True, "expected a str or number, got bool"),
    (["1", "2"], "expected a str or number, got list"),
])
def test_gold_answer_refuses_what_the_verifier_could_not_score(value, message):
    with pytest.raises(DataError, match=rf"^f:row 0: field 'answer': {message}"):
        gold_answer(value, "f:row 0: field 'answer'")


# ---------------------------------------------------------------------------------------------------------------
# Malformed rows and corrupt images name file, row and field
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,field,message", [
    ({"question": "<image>"}, "question", "empty once <image> placeholders are removed"),
    ({"answer": None}, "answer", "missing; every row needs a gold answer"),
    ({"answer": "We add them.\nThe sum is large."}, "answer", "no final answer in"),
    ({"image": {"bytes": None, "path": None}}, "image", "an image struct with neither bytes nor a path"),
    ({"image": {"bytes": None, "path": "gone.png"}}, "image", "no such file .*gone.png"),
    ({"image": {"bytes": b"not an image at all", "path": None}}, "image", r"unreadable image \(19 embedded bytes\)"),
    ({"id": "ok"}, "id", "duplicate id 'ok'"),
])
def test_a_malformed_row_names_file_row_and_field(tmp_path, change, field, message):
    first = {"id": "ok", "question": "p", "answer": "1", "image": {"bytes": encoded(15), "path": None}}
    second = {**first, "id": "x", **change}
    path = write_parquet(tmp_path / "rows.parquet", {k: [first[k], second[k]] for k in first}, {"image": IMAGE_STRUCT})
    with pytest.raises(DataError, match=rf"rows.parquet:row 1: field '{field}': {message}"):
        load_examples(path)


def test_a_wrongly_typed_cell_names_file_row_and_field(tmp_path):
    path = write_parquet(tmp_path / "typed.parquet", {"question": ["p", "q"], "answer": [1, 2], "image": [7, 8],
                                                      "id": [True, False]})
    with pytest.raises(DataError, match=r"typed.parquet:row 0: field 'id': expected a non-empty str or int id, got True"):
        load_examples(path)
    with pytest.raises(DataError, match=r"typed.parquet:row 0: field 'image': expected an image .*got 7"):
        load_examples(path, fields={"id": None})


def noise_jpeg(seed: int, size=(96, 96)) -> bytes:
    """A JPEG of random pixels: kilobytes of scan data behind a header of a few hundred bytes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_corrupt_embedded_bytes_are_caught_and_each_rank_decodes_only_its_share(tmp_path):
    full = noise_jpeg(16)
    truncated = full[:len(full) // 2]  # an interrupted download: the header is whole, the scan is cut
    huge = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 20, 30)).save(huge, "PNG")
    path = write_parquet(tmp_path / "shares.parquet", {
        "problem": ["a", "b", "c"], "answer": ["1", "2", "3"],
        "image": [{"bytes": encoded(17), "path": None}, {"bytes": truncated, "path": None},
                  {"bytes": huge.getvalue(), "path": None}]}, {"image": IMAGE_STRUCT})
    with pytest.raises(DataError, match=rf"shares.parquet:row 1: field 'image': unreadable image "
                                        rf"\({len(truncated)} embedded bytes\) \(OSError: image file is truncated"):
        load_examples(path, max_image_pixels=10_000)
    # Row 1 is rank 1's share of two: rank 0 only opens it (its header is intact), so rank 0 passes and rank 1 fails.
    rank0 = load_examples(path, max_image_pixels=10_000, rank=0, world_size=2)
    with pytest.raises(DataError, match=r"row 1: field 'image': unreadable image"):
        load_examples(path, max_image_pixels=10_000, rank=1, world_size=2)
    assert load_images(rank0[2])[0].size == (122, 81)  # 300x200 over a 10,000-pixel cap: isqrt(10000·300/200) = 122
    # An image over the cap is downscaled by every rank, whoever's share it is in, and identically.
    clean = write_parquet(tmp_path / "clean.parquet", {"problem": ["a", "c"], "answer": ["1", "3"],
                                                       "image": [encoded(17), huge.getvalue()]})
    first, second = (load_examples(clean, max_image_pixels=10_000, rank=r, world_size=2)[1].images[0] for r in (0, 1))
    assert isinstance(first, EncodedImage) and first == second


def test_without_pyarrow_the_error_names_the_extra(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "t.parquet", {"problem": ["p"], "answer": ["1"], "images": [[]]},
                         {"images": pa.list_(IMAGE_STRUCT)})
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    with pytest.raises(DataError, match=r"t.parquet: reading parquet/arrow files needs pyarrow, an optional extra: "
                                        r"pip install -e '.\[data\]'"):
        load_examples(path)


# ---------------------------------------------------------------------------------------------------------------
# Prompts from embedded images, and the converter
# ---------------------------------------------------------------------------------------------------------------

def test_encode_prompts_decodes_embedded_images_exactly_like_pil_images(tiny, tmp_path):
    _, processor = tiny
    path = write_parquet(tmp_path / "t.parquet", {"problem": ["a", "b"], "answer": ["1", "2"],
                                                  "image": [encoded(18, size=(56, 56)), encoded(19, size=(84, 56))]})
    lazy = load_examples(path)
    eager = [data.Example(e.id, problem=e.problem, images=load_images(e), answer=e.answer) for e in lazy]
    a, b = encode_prompts(processor, lazy), encode_prompts(processor, eager)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert same_pixels(eager[1].images[0], picture(19, size=(84, 56)))


def test_convert_writes_jsonl_and_image_files_that_load_to_the_same_examples(tmp_path, capsys):
    picture(20).save(tmp_path / "file.png")
    src = write_parquet(tmp_path / "src" / "train.parquet", {
        "qid": ["a", "b", "c"], "question": ["<image>One?", "Two?", "Three?"],
        "image": [[{"bytes": encoded(21), "path": None}], [{"bytes": encoded(22, "JPEG"), "path": "x.jpg"}],
                  [{"bytes": None, "path": str(tmp_path / "file.png")}]],
        "answer": ["\\boxed{1}", "2", "so the answer is 3"],
    }, {"image": pa.list_(IMAGE_STRUCT)})
    out = tmp_path / "out" / "train.jsonl"
    assert data.main(["convert", str(src), str(out)]) == 3
    assert capsys.readouterr().out == f"wrote 3 records to {out}\n"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [
        {"id": "a", "problem": "One?", "images": ["train_images/000000-0.png"], "answer": "1"},
        {"id": "b", "problem": "Two?", "images": ["train_images/000001-0.jpg"], "answer": "2"},
        {"id": "c", "problem": "Three?", "images": ["../file.png"], "answer": "3"},
    ]
    assert (out.parent / "train_images" / "000001-0.jpg").read_bytes() == encoded(22, "JPEG")  # byte for byte
    original, converted = load_examples(src), load_jsonl(out)
    assert [(e.id, e.problem, e.answer) for e in original] == [(e.id, e.problem, e.answer) for e in converted]
    assert all(same_pixels(x, y) for a, b in zip(original, converted) for x, y in zip(load_images(a), load_images(b)))


def test_convert_command_line(tmp_path):
    src = write_parquet(tmp_path / "q.parquet", {"prompt_text": ["p"], "gold": ["\\boxed{4}"], "pics": [encoded(23)]})
    out = tmp_path / "q.jsonl"
    cmd = [sys.executable, "-m", "harmo_min.data", "convert", str(src), str(out),
           "--field", "problem=prompt_text", "--field", "answer=gold", "--field", "images=pics"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == {"id": "0", "problem": "p", "images": ["q_images/000000-0.png"], "answer": "4"}
    bad = subprocess.run(cmd[:5] + [str(tmp_path / "q2.jsonl")], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert bad.returncode == 1 and "python -m harmo_min.data: error: " in bad.stderr
    assert "no column for 'problem' (looked for problem, question)" in bad.stderr


def _not_a_table(folder: Path, kind: str) -> Path:
    """Something given as data.train that is not a readable table."""
    if kind == "garbage .parquet":
        (folder / "junk.parquet").write_bytes(b"PAR1 not really")
        return folder / "junk.parquet"
    if kind == "garbage .arrow":
        (folder / "junk.arrow").write_bytes(b"\0" * 20)
        return folder / "junk.arrow"
    if kind == "broken state.json":
        (folder / "state.json").write_text("{oops")
    elif kind == "state.json naming a missing shard":
        (folder / "state.json").write_text('{"_data_files": [{"filename": "gone.arrow"}]}')
    elif kind == "a text file":
        (folder / "notes.txt").write_text("hi")
        return folder / "notes.txt"
    elif kind == "nothing there":
        return folder / "absent"
    return folder


@pytest.mark.parametrize("kind,message", [
    ("garbage .parquet", r"junk.parquet: not a readable parquet file \(Parquet magic bytes not found"),
    ("garbage .arrow", r"junk.arrow: not a readable arrow file"),
    ("broken state.json", r"state.json: not valid JSON \(Expecting property name"),
    ("state.json naming a missing shard", r"state.json: names no data files, or missing ones: \['gone.arrow'\]"),
    ("a text file", r"notes.txt: not a table file"),
    ("an empty folder", r"no .parquet or .arrow files in this folder"),
    ("nothing there", r"absent: no such file or folder"),
])
def test_what_is_not_a_table_is_named(tmp_path, kind, message):
    with pytest.raises(DataError, match=message):
        load_examples(_not_a_table(tmp_path, kind))


def test_a_corrupt_page_inside_a_parquet_file_names_the_file_and_the_row(tmp_path):
    rows = 2000
    path = write_parquet(tmp_path / "mid.parquet", {"problem": [f"p{i}" * 50 for i in range(rows)],
                                                    "answer": [str(i) for i in range(rows)]})
    pq.write_table(pq.read_table(path), path, row_group_size=500, compression="snappy")
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 200):  # garbage in the middle: the footer still reads
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"mid.parquet: unreadable after row \d+ \("):
        load_examples(path, fields={"images": None})


def test_train_py_runs_on_a_hub_parquet_and_trains_on_its_rows(tmp_path):
    """`python train.py ... data.train=that.parquet` end to end: the rows' problems and golds reach the rollout and
    the rule verifier (the samples file names them), every step routes them to the rule."""
    import train

    features = datasets.Features({"images": datasets.Sequence(datasets.Image()), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    problems = [f"<image>What is {i} + {i}?" for i in range(8)]
    ds = datasets.Dataset.from_dict({"images": [[picture(i)] for i in range(8)], "problem": problems,
                                     "answer": [f"\\boxed{{{2 * i}}}" for i in range(8)]}, features=features)
    path = tmp_path / "geo" / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    ds.to_parquet(str(path))
    history = train.main(["--config", "tests/configs/fast.yaml", f"run_dir={tmp_path / 'run'}", f"data.train={path}",
                          "train.sample_every=1"])
    assert len(history) == 2 and all(m["route/rule"] == 16 and m["route/none"] == 0 for m in history)
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step_000001_rank0.jsonl").open()]
    assert len(rows) == 16
    assert {(r["prompt"], r["gold"]) for r in rows} <= {(p[len("<image>"):], str(2 * i)) for i, p in enumerate(problems)}


def test_convert_no_check_copies_a_truncated_image_but_names_the_row_of_bytes_that_are_no_image(tmp_path):
    truncated = encoded(24, "JPEG")[:-60]  # an interrupted download: the header is intact, the pixels are not
    src = write_parquet(tmp_path / "t.parquet", {"problem": ["p", "q"], "answer": ["1", "2"],
                                                 "image": [truncated, b"<html>not an image</html>"]})
    with pytest.raises(DataError, match=r"t.parquet:row 1: field 'image'.*not an image"):
        data.convert(src, tmp_path / "t.jsonl", check_images=False)
    ok = write_parquet(tmp_path / "u.parquet", {"problem": ["p"], "answer": ["1"], "image": [truncated]})
    assert data.convert(ok, tmp_path / "u.jsonl", check_images=False) == 1
    assert (tmp_path / "u_images" / "000000-0.jpg").read_bytes() == truncated  # copied as the help text says
