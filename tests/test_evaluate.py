"""evaluate.py and evaluate_data.py: loaders per format, metrics on known answers, the CLI end to end."""

import json
import math
import os
import socket
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evaluate.py is a script at the repo root

import evaluate  # noqa: E402
from evaluate_data import inline_choices, load_benchmark, load_benchmarks, parse_spec  # noqa: E402
from harmo_min.data import DataError, EncodedImage, load_images  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# Benchmark files written the way each benchmark ships them, with generated images
# ---------------------------------------------------------------------------------------------------------------

def _image(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)


def write_mathvista(root: Path, records: dict | None = None) -> Path:
    """A testmini.json in MathVista's layout: an object keyed by pid, image paths relative to the file."""
    for pid in ("1", "2", "3"):
        _image(root / "images" / f"{pid}.png")
    records = records or {
        "1": {"pid": "1", "question": "How many bars are there?", "image": "images/1.png",
              "choices": ["3", "4", "5"], "unit": None, "precision": None, "answer": "4",
              "question_type": "multi_choice", "answer_type": "text",
              "metadata": {"task": "figure question answering", "category": "general-vqa"}},
        "2": {"pid": "2", "question": "What is the length of AB?", "image": "images/2.png", "choices": None,
              "unit": "cm", "precision": 1, "answer": "1.5", "question_type": "free_form", "answer_type": "float",
              "metadata": {"task": "geometry problem solving"}},
        "3": {"pid": "3", "question": "Find x.", "image": "images/3.png", "choices": None, "unit": None,
              "precision": None, "answer": "7", "question_type": "free_form", "answer_type": "integer",
              "metadata": {"task": "geometry problem solving"}},
    }
    path = root / "testmini.json"
    path.write_text(json.dumps(records))
    return path


def write_mathverse(root: Path) -> Path:
    _image(root / "images_version_1-4" / "image_1.png")
    _image(root / "images_version_5" / "image_1.png")
    records = [
        {"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant",
         "question": "In triangle ABC, angle A = 80 and angle B = 60. What is angle C?\nChoices:\nA:40°\nB:60°\nC:120°",
         "image": "images_version_1-4/image_1.png", "answer": "A", "question_type": "multi-choice",
         "metadata": {"split": "testmini", "subject": "Plane Geometry", "subfield": "Angle"},
         "query_wo": "ignored", "query_cot": "ignored", "question_for_eval": "ignored"},
        {"sample_index": "2", "problem_index": "1", "problem_version": "Vision Only", "question": "",
         "image": "images_version_5/image_1.png", "answer": "12", "question_type": "free-form",
         "metadata": {"split": "testmini", "subject": "Plane Geometry", "subfield": "Length"}},
    ]
    path = root / "mathverse_testmini.json"
    path.write_text(json.dumps(records))
    return path


def write_geometry3k(root: Path) -> Path:
    _image(root / "geo" / "0.png")
    _image(root / "geo" / "1.png")
    lines = [{"problem": "<image>Find x.", "answer": "4.5", "images": ["geo/0.png"]},
             {"problem": "<image>Find the area of the triangle.", "answer": "24", "images": ["geo/1.png"]}]
    path = root / "geometry3k_test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


def write_project_jsonl(root: Path) -> Path:
    _image(root / "own" / "a.png")
    lines = [{"id": "a", "problem": "What is 2 + 3?", "images": ["own/a.png"], "answer": "5"},
             {"id": "b", "problem": "Describe the image.", "images": ["own/a.png"]}]
    path = root / "own.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------

def test_mathvista_items_are_parsed_exactly(tmp_path):
    bench = load_benchmark(str(write_mathvista(tmp_path)))  # detected from the fields
    assert (bench.name, bench.format, len(bench.items)) == ("MathVista", "mathvista", 3)
    mc, fl, it = (item.example for item in bench.items)
    assert mc.id == "1" and mc.answer == "B" and mc.choices == ["3", "4", "5"]  # gold text -> its letter
    assert mc.problem == "How many bars are there?\nChoices:\n(A) 3\n(B) 4\n(C) 5"
    assert mc.images == [str(tmp_path / "images" / "1.png")] and mc.task == "verifiable"
    assert fl.answer == "1.5" and fl.choices is None
    assert fl.problem == ("What is the length of AB?\nAnswer with a number rounded to 1 decimal place. "
                          "The unit is cm; give the number only.")
    assert it.problem == "Find x.\nAnswer with an integer."
    assert [i.category for i in bench.items] == ["figure question answering"] + ["geometry problem solving"] * 2
    assert bench.items[1].meta == {"answer_type": "float", "precision": 1, "unit": "cm", "answer_text": "1.5"}
    assert bench.items[0].where == f"{tmp_path / 'testmini.json'}['1']"


def test_mathvista_key_is_the_id_when_pid_is_absent_and_list_container_works(tmp_path):
    path = write_mathvista(tmp_path)
    records = json.loads(path.read_text())
    del records["2"]["pid"]
    path.write_text(json.dumps(records))
    assert [i.example.id for i in load_benchmark(str(path)).items] == ["1", "2", "3"]
    listed = tmp_path / "as_list.json"
    listed.write_text(json.dumps([records["1"], records["3"]]))
    assert [i.example.id for i in load_benchmark(f"mathvista:{listed}").items] == ["1", "3"]


def test_mathverse_items_read_inline_choices_and_version_categories(tmp_path):
    bench = load_benchmark(str(write_mathverse(tmp_path)))
    assert (bench.name, bench.format) == ("MathVerse", "mathverse")
    mc, vo = (item.example for item in bench.items)
    assert mc.id == "1" and mc.answer == "A" and mc.choices == ["40°", "60°", "120°"]
    assert mc.problem.startswith("In triangle ABC") and mc.problem.endswith("C:120°")
    assert vo.problem == "Answer the question shown in the image." and vo.answer == "12" and vo.choices is None
    assert [i.category for i in bench.items] == ["Text Dominant", "Vision Only"]
    assert bench.items[0].meta == {"question_type": "multi-choice", "subject": "Plane Geometry", "subfield": "Angle"}


def test_inline_choices_refuses_anything_but_a_clean_letter_sequence():
    assert inline_choices("Q?\nChoices:\nA:1\nB. 2\n(C) 3") == ["1", "2", "3"]
    assert inline_choices("Q? no options") is None
    assert inline_choices("Q?\nChoices:\nA:1\nC:3") is None      # a gap: letters would map to wrong options
    assert inline_choices("Q?\nChoices:\nA:1\nsome prose") is None


def test_geometry3k_items_drop_the_image_placeholder(tmp_path):
    bench = load_benchmark(str(write_geometry3k(tmp_path)))
    assert (bench.name, bench.format) == ("Geometry3K", "geometry3k")
    assert [(i.example.id, i.example.problem, i.example.answer, i.category) for i in bench.items] == [
        ("0", "Find x.", "4.5", "all"), ("1", "Find the area of the triangle.", "24", "all")]
    assert bench.items[1].example.images == [str(tmp_path / "geo" / "1.png")]
    assert bench.items[1].where == f"{tmp_path / 'geometry3k_test.jsonl'}:2"


def test_project_jsonl_and_synthetic_specs(tmp_path):
    own = load_benchmark(str(write_project_jsonl(tmp_path)))
    assert (own.name, own.format) == ("own", "jsonl")
    assert [(i.example.id, i.example.task, i.category) for i in own.items] == [
        ("a", "verifiable", "verifiable"), ("b", "open", "open")]
    syn = load_benchmark("toy=synthetic:5:colour,count")
    assert syn.name == "toy" and [i.category for i in syn.items] == ["colour", "count", "colour", "count", "colour"]
    assert [i.example.id.split("-")[0] for i in syn.items] == [i.category for i in syn.items]
    assert len(load_benchmark("synthetic:10", limit=3).items) == 3


def test_spec_parsing_names_formats_and_duplicates(tmp_path):
    assert parse_spec("mv=mathvista:/d/x.json") == ("mv", "mathvista", "/d/x.json")
    assert parse_spec("/d/a=b/x.json") == (None, None, "/d/a=b/x.json")
    assert parse_spec("notaformat:x.json") == (None, None, "notaformat:x.json")
    path = str(write_mathvista(tmp_path))
    assert load_benchmark(f"mini=mathvista:{path}", limit=2).name == "mini"
    with pytest.raises(DataError, match="two --data give the benchmark name 'MathVista'"):
        load_benchmarks([path, path])


def test_malformed_files_name_the_file_the_record_and_the_expected_fields(tmp_path):
    path = write_mathvista(tmp_path)
    records = json.loads(path.read_text())
    del records["2"]["question_type"]
    path.write_text(json.dumps(records))
    with pytest.raises(DataError) as err:
        load_benchmark(str(path))
    msg = str(err.value)
    assert f"{path}['2']" in msg and "field 'question_type': missing" in msg
    assert "expected mathvista fields: pid (or object key), question, image, answer, question_type, answer_type" in msg

    records["2"]["question_type"] = "free_form"
    records["3"]["image"] = "images/missing.png"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"\['3'\]: field 'image': no such file .*missing.png"):
        load_benchmark(str(path))

    records["3"]["image"] = "images/3.png"
    records["1"]["answer"] = "6"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"\['1'\]: field 'answer': '6' is not one of the choices"):
        load_benchmark(str(path))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "<image>x", "answer": "1", "images": ["geo/0.png"]}) + "\n{oops\n")
    with pytest.raises(DataError, match=f"{bad}:2: not valid JSON"):
        load_benchmark(str(bad))

    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"question": "?", "label": "1"}]))
    with pytest.raises(DataError) as err:
        load_benchmark(str(unknown))
    assert f"{unknown}[0]" in str(err.value) and "['label', 'question']" in str(err.value)
    assert "geometry3k: problem, answer, images" in str(err.value) and "--data FORMAT:PATH" in str(err.value)

    geo = tmp_path / "geo.json"
    _image(tmp_path / "geo" / "0.png")
    geo.write_text(json.dumps([{"problem": "<image>Find x.", "answer": "2", "images": "geo/0.png"}]))
    with pytest.raises(DataError, match=r"geo.json\[0\]: field 'images': expected list, got str; expected geometry3k"):
        load_benchmark(str(geo))

    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"not a png")
    records["1"]["answer"], records["1"]["image"] = "4", "images/broken.png"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"\['1'\]: field 'image': unreadable image"):
        load_benchmark(str(path))


# ---------------------------------------------------------------------------------------------------------------
# The same benchmarks as the hub ships them: parquet written by `datasets`, pictures embedded
# ---------------------------------------------------------------------------------------------------------------

def _png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def write_mathvista_parquet(root: Path) -> Path:
    """MathVista testmini as the hub's parquet: write_mathvista's records, the picture embedded in `decoded_image`
    and `image` naming a file that is not beside the parquet (as after a hub download)."""
    records = json.loads(write_mathvista(root / "json").read_text())
    rows = [{**r, "decoded_image": {"bytes": _png_bytes(root / "json" / r["image"]), "path": None},
             "metadata": {"task": r["metadata"]["task"], "category": r["metadata"].get("category")},
             "precision": None if r["precision"] is None else float(r["precision"]), "query": r["question"]}
            for r in records.values()]
    features = datasets.Features({
        "pid": datasets.Value("string"), "question": datasets.Value("string"), "image": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "unit": datasets.Value("string"),
        "precision": datasets.Value("float64"), "answer": datasets.Value("string"),
        "question_type": datasets.Value("string"), "answer_type": datasets.Value("string"),
        "metadata": {"task": datasets.Value("string"), "category": datasets.Value("string")},
        "decoded_image": datasets.Image(), "query": datasets.Value("string")})
    path = root / "MathVista" / "data" / "testmini-00000-of-00001-725687bf7a18d64b.parquet"
    path.parent.mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def write_mathverse_parquet(root: Path) -> Path:
    records = json.loads(write_mathverse(root / "json").read_text())
    rows = [{**{k: v for k, v in r.items() if k != "image"}, "image": {"bytes": _png_bytes(root / "json" / r["image"]),
                                                                         "path": None}} for r in records]
    for row in rows:
        row.setdefault("query_wo", None), row.setdefault("query_cot", None), row.setdefault("question_for_eval", None)
    path = root / "MathVerse" / "testmini.parquet"
    path.parent.mkdir(parents=True)
    features = datasets.Features({**{k: datasets.Value("string") for k in rows[0] if k not in ("image", "metadata")},
                                  "image": datasets.Image(),
                                  "metadata": {k: datasets.Value("string") for k in ("split", "subject", "subfield")}})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def _same_items(a, b) -> bool:
    """Two benchmarks hold the same items: fields, categories, extras and image pixels."""
    def fields(item):
        ex = item.example
        return ex.id, ex.problem, ex.answer, ex.choices, ex.task, item.category, item.meta
    return [fields(i) for i in a.items] == [fields(i) for i in b.items] and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for i, j in zip(a.items, b.items) for x, y in zip(load_images(i.example), load_images(j.example)))


def test_mathvista_parquet_reads_exactly_like_its_json(tmp_path):
    path = write_mathvista_parquet(tmp_path)
    bench = load_benchmark(str(path))  # detected from the columns; decoded_image wins over the missing file
    assert (bench.name, bench.format, len(bench.items)) == ("MathVista", "mathvista", 3)
    assert _same_items(bench, load_benchmark(str(tmp_path / "json" / "testmini.json")))
    assert isinstance(bench.items[0].example.images[0], EncodedImage)
    assert bench.items[1].where == f"{path}:row 1"
    folder = load_benchmark(str(tmp_path / "MathVista"))  # the downloaded dataset folder
    assert (folder.name, [i.example.id for i in folder.items]) == ("MathVista", ["1", "2", "3"])
    assert len(load_benchmark(str(path), limit=2).items) == 2


def test_mathverse_parquet_reads_exactly_like_its_json(tmp_path):
    bench = load_benchmark(str(write_mathverse_parquet(tmp_path)))
    assert (bench.name, bench.format) == ("MathVerse", "mathverse")
    assert _same_items(bench, load_benchmark(str(tmp_path / "json" / "mathverse_testmini.json")))


def test_a_training_table_is_the_dataset_format_read_by_the_training_loader(tmp_path):
    _image(tmp_path / "a.png")
    folder = tmp_path / "mmk12" / "data"
    folder.mkdir(parents=True)
    datasets.Dataset.from_dict(
        {"id": ["m1", "m2"], "question": ["What is 1 + 1?", "Name the shape."], "image": [str(tmp_path / "a.png")] * 2,
         "answer": ["\\boxed{2}", "a triangle"], "subject": ["math", "math"]},
        features=datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                                    "image": datasets.Image(), "answer": datasets.Value("string"),
                                    "subject": datasets.Value("string")}),
    ).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    bench = load_benchmark(str(tmp_path / "mmk12"))
    assert (bench.name, bench.format) == ("mmk12", "dataset")
    assert [(i.example.id, i.example.answer, i.category) for i in bench.items] == [("m1", "2", "verifiable"),
                                                                                ("m2", "a triangle", "verifiable")]
    renamed = load_benchmark(f"mm=dataset:{folder}/test-*.parquet", fields={"answer": None})
    assert renamed.name == "mm" and [i.category for i in renamed.items] == ["open", "open"]
    with pytest.raises(DataError, match=r"--field maps the columns of 'dataset' tables, and no --data is one "
                                        r"\(formats: geometry3k\)"):
        load_benchmarks([str(write_geometry3k(tmp_path))], fields={"answer": "x"})


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------

def test_pass_at_k_matches_hand_computed_values():
    # 1 − C(n − c, k) / C(n, k), worked by hand:
    assert evaluate.pass_at_k(5, 2, 1) == pytest.approx(1 - 3 / 5)      # C(3,1)/C(5,1)
    assert evaluate.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)     # C(3,2)/C(5,2)
    assert evaluate.pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)     # C(3,3)/C(5,3)
    assert evaluate.pass_at_k(5, 2, 4) == 1.0                           # only 3 wrong: any 4 contain a right one
    assert evaluate.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    assert evaluate.pass_at_k(4, 0, 4) == 0.0 and evaluate.pass_at_k(4, 4, 1) == 1.0
    for n in range(1, 9):  # pass@1 is the plain mean; the product form of Chen et al. agrees everywhere
        for c in range(n + 1):
            assert evaluate.pass_at_k(n, c, 1) == pytest.approx(c / n)
            for k in range(1, n + 1):
                product = 1.0 if n - c < k else 1 - math.prod(1 - k / i for i in range(n - c + 1, n + 1))
                assert evaluate.pass_at_k(n, c, k) == pytest.approx(product)
    assert evaluate.pass_at_k(1000, 10, 500) == pytest.approx(1 - 0.5 ** 10, abs=2e-3)  # huge binomials are fine
    with pytest.raises(ValueError, match="1 <= k <= n"):
        evaluate.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        evaluate.pass_at_k(4, 5, 1)
    assert evaluate.default_ks(1) == [1] and evaluate.default_ks(8) == [1, 2, 4, 8]
    assert evaluate.default_ks(6) == [1, 2, 4, 6]


def test_relative_gain_arithmetic():
    assert evaluate.relative_gain(0.55, 0.50) == pytest.approx(0.10)
    assert evaluate.relative_gain(0.40, 0.50) == pytest.approx(-0.20)
    assert evaluate.relative_gain(0.30, 0.0) is None and evaluate.relative_gain(None, 0.5) is None


def _row(bench, iid, correct, reasons=None, fmt=None, lengths=None, finish=None, category="c"):
    n = len(correct) if correct is not None else len(lengths)
    return {"benchmark": bench, "id": iid, "category": category, "correct": correct,
            "reason": reasons or (None if correct is None else ["exact"] * n), "format_ok": fmt,
            "lengths": lengths or [10] * n, "finish": finish or ["eos"] * n}


def test_summarize_counts_every_metric_exactly():
    rows = [_row("B", "1", [True, False, False, True], reasons=["exact", "no_answer", "choice", "exact"],
                 fmt=[True, False, True, True], lengths=[4, 8, 12, 16], finish=["eos", "length", "eos", "eos"]),
            _row("B", "2", [False] * 4, reasons=["no_answer"] * 4, fmt=[False] * 4),
            _row("B", "3", None, fmt=[True] * 4, lengths=[2, 2, 2, 2], category="open")]
    s = evaluate.summarize(rows, [1, 2, 4])
    assert (s["items"], s["scored"], s["open_skipped"]) == (3, 2, 1)
    assert s["accuracy"] == pytest.approx((2 / 4 + 0) / 2)
    assert s["pass@2"] == pytest.approx((1 - 1 / 6 + 0) / 2)  # 1 − C(2,2)/C(4,2) for item 1
    assert s["pass@4"] == pytest.approx(0.5)
    assert s["format"] == pytest.approx(7 / 12) and s["no_answer"] == pytest.approx(5 / 8)  # open items: no verdicts
    assert s["truncated"] == pytest.approx(1 / 12) and s["length"] == pytest.approx((40 + 40 + 8) / 12)
    none = evaluate.summarize([_row("B", "3", None, lengths=[1])], [1])
    assert none["accuracy"] is None and none["format"] is None and none["open_skipped"] == 1


def test_compare_reports_absolute_and_relative_gains_and_wins():
    benches = [type("B", (), {"name": n})() for n in ("X", "Y")]
    ours = [_row("X", "1", [True, True]), _row("X", "2", [True, False]), _row("Y", "1", [True, False])]
    base = [_row("X", "1", [False, False]), _row("X", "2", [True, True]), _row("Y", "1", [False, False])]
    m, b = (evaluate.summarize_model(rows, benches, [1]) for rows in (ours, base))
    comp = evaluate.compare(ours, base, m, b)
    x, y, avg = comp["benchmarks"]["X"], comp["benchmarks"]["Y"], comp["average"]
    assert (x["baseline"], x["model"], x["abs_gain"], x["rel_gain"]) == (0.5, 0.75, 0.25, 0.5)
    assert (x["wins"], x["losses"]) == (1, 1)
    assert (y["baseline"], y["model"], y["rel_gain"], y["wins"]) == (0.0, 0.5, None, 1)  # base 0: no relative gain
    assert avg["baseline"] == 0.25 and avg["model"] == 0.625 and avg["abs_gain"] == pytest.approx(0.375)
    assert avg["mean_rel_gain"] == 0.5 and avg["rel_gain_of_average"] == pytest.approx(1.5)


# ---------------------------------------------------------------------------------------------------------------
# main() on known answers: the whole pipeline (loaders, verifier, metrics, comparison, JSON, table) without a model
# ---------------------------------------------------------------------------------------------------------------

T = "<think>s</think><answer>{}</answer>"
SCRIPT = {
    # Item 1: 2 correct (the letter, the option text); a long reply with no answer in it is "no answer".
    "ours": {"1": [T.format("B"), T.format("A"), T.format("4"), "Let me count the bars again, more carefully now."],
             "2": [T.format("1.5"), T.format("1.50 cm"), "The answer is 1.5", T.format("2")],  # 3 correct
             "3": ["<answer>8</answer>", T.format("6"), "", T.format("")],              # 0 correct, 2 unextractable
             "a": [T.format("5")] * 4, "b": [T.format("a red square")] * 4},
    "base": {"1": ["<answer>B</answer>"] + ["<answer>C</answer>"] * 3,
             "2": ["<answer>1.5</answer>"] + ["<answer>3</answer>"] * 3, "3": ["<answer>6</answer>"] * 4,
             "a": ["<answer>5</answer>"] * 2 + ["<answer>4</answer>"] * 2, "b": ["red"] * 4},
}


def scripted_generate(model, processor, examples, *, args, seed):
    assert args.n == 4 and len(examples) <= args.batch_size
    return [{"texts": SCRIPT[model][ex.id], "lengths": [10, 20, 30, 40], "finish": ["eos", "eos", "eos", "length"]}
            for ex in examples]


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(evaluate, "load_model", lambda spec, **kw: (spec, None))
    return scripted_generate


def test_main_on_known_answers_computes_every_number(tmp_path, scripted, capsys):
    vista, own = write_mathvista(tmp_path), write_project_jsonl(tmp_path)
    out = tmp_path / "results.json"
    results = evaluate.main(["--model", "ours", "--baseline", "base", "--data", str(vista), "--data", str(own),
                             "--n", "4", "--temperature", "1", "--batch-size", "2", "--out", str(out)],
                            generate_fn=scripted)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    mv, ow = results["model"]["benchmarks"]["MathVista"], results["model"]["benchmarks"]["own"]
    assert mv["accuracy"] == pytest.approx((2 / 4 + 3 / 4 + 0) / 3)
    assert mv["pass@2"] == pytest.approx((1 - 1 / 6 + 1 + 0) / 3) and mv["pass@4"] == pytest.approx(2 / 3)
    assert mv["format"] == pytest.approx(7 / 12) and mv["no_answer"] == pytest.approx(3 / 12)
    assert mv["truncated"] == 0.25 and mv["length"] == 25.0
    assert mv["categories"]["figure question answering"]["accuracy"] == 0.5
    assert mv["categories"]["geometry problem solving"]["accuracy"] == pytest.approx(3 / 8)
    assert (ow["accuracy"], ow["scored"], ow["open_skipped"], ow["format"]) == (1.0, 1, 1, 1.0)
    assert results["model"]["average"]["accuracy"] == pytest.approx((5 / 12 + 1) / 2)

    item = results["model"]["items"][0]
    assert (item["benchmark"], item["id"], item["gold"], item["category"]) == ("MathVista", "1", "B",
                                                                                "figure question answering")
    assert item["correct"] == [True, False, True, False] and item["pred"] == ["B", "A", "4", None]
    assert item["reason"][3] == "no_answer" and item["responses"] == SCRIPT["ours"]["1"]
    open_item = results["model"]["items"][-1]
    assert open_item["id"] == "b" and open_item["correct"] is None and open_item["format_ok"] == [True] * 4

    comp = results["comparison"]
    assert comp["benchmarks"]["MathVista"]["baseline"] == pytest.approx(1 / 6)
    assert comp["benchmarks"]["MathVista"]["abs_gain"] == pytest.approx(0.25)
    assert comp["benchmarks"]["MathVista"]["rel_gain"] == pytest.approx(1.5)
    assert (comp["benchmarks"]["MathVista"]["wins"], comp["benchmarks"]["MathVista"]["losses"]) == (2, 0)
    assert comp["benchmarks"]["own"]["rel_gain"] == pytest.approx(1.0)
    assert comp["average"]["mean_rel_gain"] == pytest.approx(1.25)
    assert comp["average"]["rel_gain_of_average"] == pytest.approx((17 / 24 - 1 / 3) / (1 / 3))

    table = capsys.readouterr().out
    assert "| MathVista | 3 | 41.7 | 61.1 | 66.7 | 58.3 | 25.0 | 25.0 | 25.0 |" in table
    assert "| MathVista | 16.7 | 41.7 | +25.0 | +150.0 % | 2 / 0 |" in table
    assert "| **average** | 33.3 | 70.8 | +37.5 | +125.0 % |  |" in table
    assert "1 open-ended item(s) without a gold answer" in table and "relative gain of the average accuracy: +112.5 %" in table


def test_cli_rejects_inconsistent_sampling_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "tiny", "--data", "synthetic:2", "--n", "4"])
    assert "identical responses: add --temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "tiny", "--data", "synthetic:2", "--n", "2", "--temperature", "1", "--k", "3"])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--data", "synthetic:2"])
    assert evaluate.parse_args(["--model", "m", "--data", "d", "--n", "8", "--temperature", "1"]).ks == [1, 2, 4, 8]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, argv: list, out_dir: str) -> None:
    # A forked child: it inherits the test's patched `evaluate.load_model` and joins a real gloo group.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    seen = []

    def generate(model, processor, examples, *, args, seed):
        seen.extend(ex.id for ex in examples)
        return scripted_generate(model, processor, examples, args=args, seed=seed)

    results = evaluate.main(argv, generate_fn=generate)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"results": results, "seen": seen}))


def test_two_ranks_split_the_items_and_gather_the_same_results(tmp_path, scripted):
    argv = ["--model", "ours", "--baseline", "base", "--data", str(write_mathvista(tmp_path)),
            "--data", str(write_project_jsonl(tmp_path)), "--n", "4", "--temperature", "1", "--batch-size", "2"]
    single = evaluate.main(argv, generate_fn=scripted)
    torch.multiprocessing.start_processes(_rank_main, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2,
                                          start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Each rank answered every other item, once per model; together they answered each item exactly once.
    assert ranks[0]["seen"] == ["1", "3", "b"] * 2 and ranks[1]["seen"] == ["2", "a"] * 2
    for r in ranks:
        r["results"]["config"]["world_size"] = 1
        for role in ("model", "baseline"):
            r["results"][role]["seconds"] = single[role]["seconds"]
        assert r["results"] == json.loads(json.dumps(single))


# ---------------------------------------------------------------------------------------------------------------
# End to end with a real (tiny) checkpoint on disk
# ---------------------------------------------------------------------------------------------------------------

def test_end_to_end_saved_tiny_checkpoint_against_the_same_untrained_start(tmp_path):
    from harmo_min.model import build_tiny

    model, processor = build_tiny(seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "r.json"
    evaluate.main(["--model", str(tmp_path / "ckpt"), "--baseline", "tiny", "--data", str(write_mathvista(tmp_path)),
                   "--max-new-tokens", "5", "--batch-size", "2", "--out", str(out)])
    results = json.loads(out.read_text())
    assert set(results) == {"config", "benchmarks", "model", "baseline", "comparison"}
    assert results["benchmarks"] == [{"name": "MathVista", "format": "mathvista",
                                      "path": str(tmp_path / "testmini.json"), "items": 3}]
    assert results["config"]["n"] == 1 and results["config"]["temperature"] == 0.0 and results["config"]["ks"] == [1]
    m = results["model"]
    assert set(m) == {"name", "seconds", "benchmarks", "average", "items"}
    assert set(m["benchmarks"]["MathVista"]) == {"items", "scored", "open_skipped", "accuracy", "pass@1", "format",
                                                 "no_answer", "truncated", "length", "categories"}
    assert [i["id"] for i in m["items"]] == ["1", "2", "3"]
    for item in m["items"]:
        assert len(item["responses"]) == len(item["correct"]) == len(item["reason"]) == 1
        assert 1 <= item["lengths"][0] <= 5 and item["finish"][0] in ("eos", "length")
    bench = m["benchmarks"]["MathVista"]
    assert bench["accuracy"] == sum(i["correct"][0] for i in m["items"]) / 3 == bench["pass@1"]
    assert bench["length"] == pytest.approx(sum(i["lengths"][0] for i in m["items"]) / 3)
    # The checkpoint is build_tiny(0) saved and reloaded, the baseline is build_tiny(0): same greedy answers.
    assert [i["responses"] for i in m["items"]] == [i["responses"] for i in results["baseline"]["items"]]
    assert results["comparison"]["benchmarks"]["MathVista"]["abs_gain"] == 0.0
    assert results["comparison"]["benchmarks"]["MathVista"]["wins"] == 0


def test_main_on_a_parquet_benchmark_gives_the_same_numbers_as_on_its_json(tmp_path, scripted):
    argv = ["--model", "ours", "--baseline", "base", "--n", "4", "--temperature", "1", "--batch-size", "2"]
    parquet = evaluate.main(argv + ["--data", str(write_mathvista_parquet(tmp_path))], generate_fn=scripted)
    as_json = evaluate.main(argv + ["--data", str(tmp_path / "json" / "testmini.json")], generate_fn=scripted)
    for role in ("model", "baseline"):
        assert parquet[role]["benchmarks"] == as_json[role]["benchmarks"]
    assert parquet["comparison"] == as_json["comparison"]
    assert parquet["benchmarks"][0]["format"] == "mathvista"


def test_end_to_end_tiny_model_on_a_geometry3k_parquet(tmp_path):
    path = tmp_path / "geometry3k" / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pictures = [Image.new("RGB", (56, 56), c) for c in ((200, 30, 30), (30, 30, 200))]
    datasets.Dataset.from_dict(
        {"images": [[pictures[0]], [pictures[1]]], "problem": ["<image>Find x.", "<image>Find y."],
         "answer": ["3", "\\boxed{4}"]},
        features=datasets.Features({"images": datasets.Sequence(datasets.Image()), "problem": datasets.Value("string"),
                                    "answer": datasets.Value("string")}),
    ).to_parquet(str(path))
    out = tmp_path / "r.json"
    evaluate.main(["--model", "tiny", "--data", str(tmp_path / "geometry3k"), "--max-new-tokens", "3",
                   "--batch-size", "2", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["benchmarks"] == [{"name": "Geometry3K", "format": "geometry3k",
                                      "path": str(tmp_path / "geometry3k"), "items": 2}]
    items = results["model"]["items"]
    assert [(i["id"], i["gold"], i["where"]) for i in items] == [("0", "3", f"{path}:row 0"), ("1", "\\boxed{4}", f"{path}:row 1")]
    assert all(1 <= i["lengths"][0] <= 3 and len(i["correct"]) == 1 for i in items)
    with pytest.raises(DataError, match=r"--field gold=x: expected FIELD=COLUMN"):
        evaluate.main(["--model", "tiny", "--data", str(path), "--field", "gold=x"])


# ---------------------------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------------------------

def _write_metrics(run: Path, tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    recs = [{"step": s, "reward/total": 0.1 * s, "reward/accuracy": 0.1 * s, "reward/format": 1.0,
             "reward/length": -0.05, "accuracy": 0.1 * s, "response_length": 30 - s, "kl": 0.01 * s,
             "route/rule": 16, "route/none": 0, "eos_rate": 1.0} for s in (1, 2, 3)]
    del recs[1]["kl"]  # a key missing on some steps is fine
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return run


def test_plot_groups_put_every_logged_key_in_a_panel(tmp_path):
    run = _write_metrics(tmp_path / "run", tail='{"step": 4, "reward/to')  # a run still writing its last line
    panels = evaluate.plot_groups(evaluate.read_metrics(run / "metrics.jsonl"))
    assert list(panels) == ["reward: total and each aspect", "accuracy", "response length (tokens)",
                            "KL to the reference", "routes (responses per step)", "eos_rate"]
    assert list(panels["reward: total and each aspect"]) == ["reward/total", "reward/accuracy", "reward/format",
                                                             "reward/length"]
    assert panels["KL to the reference"]["kl"] == ([1, 3], [0.01, 0.03])
    assert panels["response length (tokens)"]["response_length"] == ([1, 2, 3], [29.0, 28.0, 27.0])
    bad = tmp_path / "bad" / "metrics.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"step": 1}\n{broken\n{"step": 3}\n')
    with pytest.raises(DataError, match=f"{bad}:2: not valid JSON"):
        evaluate.read_metrics(bad)


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    run = _write_metrics(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(evaluate.PlotUnavailable, match=r"pip install 'harmo_min\[plot\]'"):
        evaluate.main(["--plot", str(run)])
    assert not (run / "curves.png").exists()


def test_plot_writes_a_png_when_matplotlib_is_installed(tmp_path):
    run = _write_metrics(tmp_path / "run")  # matplotlib comes with the `test` extra; the absent case is tested above
    out = evaluate.main(["--plot", str(run)])
    assert out == run / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.width > 800 and im.height > 300  # 3 columns x 2 rows of panels
    custom = evaluate.main(["--plot", str(run / "metrics.jsonl"), "--out", str(tmp_path / "figs" / "c.png")])
    assert custom == tmp_path / "figs" / "c.png" and custom.is_file()
