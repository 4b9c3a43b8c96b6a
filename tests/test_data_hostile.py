"""Hostile data inputs (issue #11, items 4, 5, 7 and evaluate.py's part of 9): each one failed on the code before
its fix, by crashing mid-run, crashing with no file named, or being accepted.

Corrupt images are made the way they arrive in practice: a JPEG cut short by an interrupted download, and a PNG whose
compressed stream is garbage behind valid chunk checksums (so PIL's `verify()` passes it and only a decode fails).
"""

import io
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evaluate.py is a script at the repo root

import evaluate  # noqa: E402
from evaluate_data import load_benchmark  # noqa: E402
from harmo_min.data import DataError, load_images, load_jsonl  # noqa: E402


def _photo(size=(64, 48)) -> Image.Image:
    """A picture with detail in every row, so a JPEG of it has data all the way to the end."""
    im = Image.new("RGB", size)
    im.putdata([((x * 7) % 256, (y * 5) % 256, (x * y) % 256) for y in range(size[1]) for x in range(size[0])])
    return im


def truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    _photo().save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def png_with_corrupt_stream(path: Path) -> Path:
    """A PNG whose IDAT data is not a zlib stream, with a correct CRC: it passes `Image.verify()`."""
    buf = io.BytesIO()
    _photo().save(buf, "PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[at:at + 4])
    garbage = bytes((i * 37 + 11) % 256 for i in range(length))
    data[at + 8:at + 8 + length] = garbage
    data[at + 8 + length:at + 12 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + garbage))
    path.write_bytes(bytes(data))
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height in its header; enough for PIL to judge its size at open."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def _jsonl(tmp_path, records, name="data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------------------------------------------
# 4. corrupt images are caught at load, naming file:line:field (training JSONL, preference pairs, benchmarks)
# ---------------------------------------------------------------------------------------------------------------

def test_a_corrupt_image_really_passes_pil_verify(tmp_path):
    # The premise of item 4: verify() is not a decode, so a validator built on it lets these through.
    for make in (truncated_jpeg, png_with_corrupt_stream):
        path = make(tmp_path / make.__name__)
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im, pytest.raises(Exception):
            im.load()


@pytest.mark.parametrize("make", [truncated_jpeg, png_with_corrupt_stream])
def test_training_jsonl_with_a_corrupt_image_fails_at_load_naming_file_line_field(tmp_path, make):
    good = tmp_path / "good.png"
    _photo().save(good)
    bad = make(tmp_path / "bad.img")
    path = _jsonl(tmp_path, [{"id": "a", "problem": "p", "images": ["good.png"], "answer": "1"},
                             {"id": "b", "problem": "p", "images": ["good.png", "bad.img"], "answer": "1"}])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert f"{path}:2: field 'images[1]': unreadable image {bad}" in str(err.value)


@pytest.mark.parametrize("make", [truncated_jpeg, png_with_corrupt_stream])
def test_benchmark_with_a_corrupt_image_fails_at_load_naming_the_record(tmp_path, make):
    make(tmp_path / "0.png")
    path = _jsonl(tmp_path, [{"problem": "<image>Find x.", "answer": "2", "images": ["0.png"]}], "geo.jsonl")
    with pytest.raises(DataError, match=rf"geo.jsonl:1: field 'images\[0\]': unreadable image"):
        load_benchmark(str(path))


# ---------------------------------------------------------------------------------------------------------------
# 5. `messages` records that used to validate and then crash at step 1
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("messages,expected", [
    ([], "field 'messages': empty"),
    ([{"role": "user"}], "field 'messages[0].content': missing"),
    ([{"role": "user", "content": 5}], "field 'messages[0].content': expected a string or a list of parts, got int"),
    ([{"role": "user", "content": [{"type": "text"}]}], "field 'messages[0].content[0]'"),
    ([{"role": "user", "content": [{"type": "video"}]}], "field 'messages[0].content[0]'"),
    ([{"role": "user", "content": ["hi"]}], "field 'messages[0].content[0]'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "must end with a user turn"),
])
def test_messages_that_cannot_be_prompted_are_rejected_at_load(tmp_path, messages, expected):
    path = _jsonl(tmp_path, [{"id": "a", "messages": messages}])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert f"{path}:1: " in str(err.value) and expected in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# 7. non-UTF-8 bytes name the file and line
# ---------------------------------------------------------------------------------------------------------------

def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"id": "a", "problem": "p"}\n{"id": "b", "problem": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8 \(byte 0xe9 at column 28\)"):
        load_jsonl(path)


def test_non_utf8_benchmark_and_metrics_files_name_file_and_line(tmp_path):
    _photo().save(tmp_path / "0.png")
    bench = tmp_path / "geo.json"
    bench.write_bytes(b'[{"problem": "<image>x", "answer": "1",\n "images": ["0.png"], "note": "\xff"}]')
    with pytest.raises(DataError, match=rf"{bench}:2: not valid UTF-8 \(byte 0xff at column 32\)"):
        load_benchmark(str(bench))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1}\n{"step": 2, "x": "\x80"}\n')
    with pytest.raises(DataError, match=rf"{metrics}:2: not valid UTF-8"):
        evaluate.read_metrics(metrics)


def test_a_utf8_bom_and_unicode_line_separators_inside_strings_are_fine(tmp_path):
    # Editors on Windows write a BOM; json.dumps(ensure_ascii=False) writes U+2028 raw inside strings, and
    # str.splitlines() splits there: only "\n" ends a JSON Lines record.
    path = tmp_path / "data.jsonl"
    path.write_bytes("\ufeff".encode() + json.dumps({"id": "a", "problem": "one\u2028two"}, ensure_ascii=False).encode()
                     + b"\n")
    (example,) = load_jsonl(path)
    assert example.problem == "one\u2028two"
    _photo().save(tmp_path / "0.png")
    bench = tmp_path / "geo.jsonl"
    bench.write_text(json.dumps({"problem": "<image>a\u2028b", "answer": "1", "images": ["0.png"]},
                                ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_benchmark(str(bench)).items[0].example.problem == "a\u2028b"


# ---------------------------------------------------------------------------------------------------------------
# 9. evaluate.py: unknown FORMAT: prefix, decompression bombs, huge images
# ---------------------------------------------------------------------------------------------------------------

def test_an_unknown_format_prefix_names_the_formats(tmp_path):
    with pytest.raises(DataError) as err:
        load_benchmark(f"mathvsta:{tmp_path / 'testmini.json'}")
    msg = str(err.value)
    assert "unknown format 'mathvsta'" in msg and "mathvista, mathverse, geometry3k" in msg


def test_a_decompression_bomb_is_a_clear_error_in_benchmarks_and_training_data(tmp_path):
    png_header_only(tmp_path / "bomb.png", 15000, 15000)  # 225 M pixels: over PIL's 179 M limit
    bench = _jsonl(tmp_path, [{"problem": "<image>Find x.", "answer": "2", "images": ["bomb.png"]}], "geo.jsonl")
    with pytest.raises(DataError, match=r"geo.jsonl:1: field 'images\[0\]': .*decompression-bomb limit"):
        load_benchmark(str(bench))
    train = _jsonl(tmp_path, [{"id": "a", "problem": "p", "images": ["bomb.png"], "answer": "1"}])
    with pytest.raises(DataError, match=r"data.jsonl:1: field 'images\[0\]': .*decompression-bomb limit"):
        load_jsonl(train)


def test_a_10000_pixel_square_image_is_downscaled_once_at_load_and_logged(tmp_path, caplog):
    Image.new("L", (10000, 10000), 128).save(tmp_path / "huge.jpg", quality=50)
    _photo().save(tmp_path / "small.png")
    train = _jsonl(tmp_path, [{"id": "a", "problem": "p", "images": ["huge.jpg", "small.png"], "answer": "1"}])
    with caplog.at_level("WARNING", logger="harmo_min.data"):
        (example,) = load_jsonl(train)
    big, small = load_images(example)
    assert big.size == (2048, 2048) and small.size == (64, 48)  # 2048 x 2048 = the default cap, aspect kept
    assert example.images[1] == str(tmp_path / "small.png")   # images under the cap stay references to their files
    assert "1 image(s) over 4194304 pixels downscaled once at load" in caplog.text
    assert f"{train}:1: field 'images[0]' 10000x10000 -> 2048x2048" in caplog.text

    bench = _jsonl(tmp_path, [{"problem": "<image>Find x.", "answer": "2", "images": ["huge.jpg"]}], "geo.jsonl")
    (item,) = load_benchmark(str(bench)).items
    assert load_images(item.example)[0].size == (2048, 2048)


def test_the_pixel_cap_is_validated_and_the_full_decode_is_split_between_ranks(tmp_path):
    truncated_jpeg(tmp_path / "cut.jpg")
    _photo().save(tmp_path / "ok.png")
    path = _jsonl(tmp_path, [{"id": "a", "problem": "p", "images": ["ok.png"]},
                             {"id": "b", "problem": "p", "images": ["cut.jpg"]}])
    assert [e.id for e in load_jsonl(path, rank=0, world_size=2)] == ["a", "b"]  # line 2 is rank 1's to decode
    with pytest.raises(DataError, match=r"data.jsonl:2: field 'images\[0\]': unreadable image"):
        load_jsonl(path, rank=1, world_size=2)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="data.max_image_pixels: must be an int >= 1 or null"):
            load_jsonl(path, max_image_pixels=bad)


@pytest.mark.parametrize("record", [{"id": "x", "problem": None, "answer": "3"},
                                    {"id": "x", "problem": None, "messages": None, "answer": "3"}])
def test_a_null_problem_without_messages_names_file_and_line(tmp_path, record):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"id": "ok", "problem": "fine", "answer": "1"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: field 'problem': give exactly one of 'problem' or 'messages'"):
        load_jsonl(path)
