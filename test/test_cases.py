"""Tests for fetuskit.cases: folder and JSON case lists, path resolution and checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fetuskit.cases import Case, find_label, load_cases
from fetuskit.errors import CaseListError

IMAGE = np.zeros((4, 4), np.uint8)


def write_list(path: Path, entries: object) -> Path:
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return path


def test_images_folder_finds_labels(tmp_path, write_case, write_h5):
    write_case("2", np.zeros((4, 4)), [0] * 7)
    write_case("1", np.zeros((4, 4)), [0] * 7)
    write_h5(tmp_path / "images" / "3.h5", image=IMAGE)
    (tmp_path / "images" / "notes.txt").write_text("not a case")

    cases = load_cases(tmp_path / "images")

    assert [case.name for case in cases] == ["1.h5", "2.h5", "3.h5"]
    assert cases[0].image == tmp_path / "images" / "1.h5"
    assert cases[0].label == tmp_path / "labels" / "1_label.h5"
    assert cases[2].label is None
    assert all(case.view_id is None for case in cases)


def test_plain_folder_has_no_labels(tmp_path, write_h5):
    write_h5(tmp_path / "inputs" / "1.h5", image=IMAGE)
    write_h5(tmp_path / "labels" / "1_label.h5", mask=IMAGE, label=np.zeros(7, np.uint8))
    cases = load_cases(tmp_path / "inputs")
    assert cases == [Case(name="1.h5", image=tmp_path / "inputs" / "1.h5", label=None, view_id=None)]


def test_find_label_in_given_folder(tmp_path, write_h5):
    write_h5(tmp_path / "gt" / "7_label.h5", mask=IMAGE)
    assert find_label(tmp_path / "anywhere" / "7.h5", tmp_path / "gt") == tmp_path / "gt" / "7_label.h5"
    assert find_label(tmp_path / "anywhere" / "8.h5", tmp_path / "gt") is None
    assert find_label(tmp_path / "anywhere" / "7.h5") is None


def test_empty_folder_rejected(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(CaseListError, match="contains no .h5 files"):
        load_cases(tmp_path / "images")


def test_missing_source_rejected(tmp_path):
    with pytest.raises(CaseListError, match="case list not found"):
        load_cases(tmp_path / "absent.json")


def test_json_entries_parsed(tmp_path, write_h5):
    image = write_h5(tmp_path / "data" / "5.h5", image=IMAGE)
    label = write_h5(tmp_path / "data" / "5_label.h5", mask=IMAGE)
    other = write_h5(tmp_path / "data" / "6.h5", image=IMAGE)
    entries = [
        {"image": str(image), "label": str(label), "view_id": 3},
        {"image": str(other), "label": None},
    ]
    cases = load_cases(write_list(tmp_path / "list.json", entries))
    assert cases == [
        Case(name="5.h5", image=image, label=label, view_id=3),
        Case(name="6.h5", image=other, label=None, view_id=None),
    ]


def test_json_resolution_order(tmp_path, write_h5, monkeypatch):
    # The same relative path exists relative to the working folder and to the list's folder.
    working = tmp_path / "work"
    list_dir = tmp_path / "lists"
    input_dir = tmp_path / "inputs"
    write_h5(working / "sub" / "a.h5", image=IMAGE)
    write_h5(list_dir / "sub" / "a.h5", image=IMAGE)
    write_h5(list_dir / "sub" / "b.h5", image=IMAGE)
    write_h5(input_dir / "b.h5", image=IMAGE)
    write_h5(input_dir / "c.h5", image=IMAGE)
    monkeypatch.chdir(working)
    entries = [{"image": "sub/a.h5"}, {"image": "sub/b.h5"}, {"image": "elsewhere/c.h5"}]

    cases = load_cases(write_list(list_dir / "list.json", entries), input_dir=input_dir)

    assert cases[0].image == Path("sub/a.h5")
    assert cases[1].image == list_dir / "sub" / "b.h5"
    assert cases[2].image == input_dir / "c.h5"


def test_json_all_problems_in_one_error(tmp_path, write_h5):
    image = write_h5(tmp_path / "1.h5", image=IMAGE)
    entries = [
        {"image": str(image)},
        {"label": "x_label.h5"},
        {"image": "missing.h5"},
        {"image": str(image), "label": "missing_label.h5"},
        {"image": str(image), "view_id": 5},
        "just a string",
    ]
    with pytest.raises(CaseListError) as raised:
        load_cases(write_list(tmp_path / "list.json", entries))
    message = str(raised.value)
    assert "5 of 6 entries are invalid" in message
    assert "entry 1: missing or invalid 'image' path: None" in message
    assert "entry 1: label 'x_label.h5' not found" in message
    assert "entry 2: image 'missing.h5' not found" in message
    assert "entry 3: label 'missing_label.h5' not found" in message
    assert "entry 4: invalid 'view_id' 5" in message
    assert "entry 5: expected an object" in message
    assert "entry 0" not in message


def test_invalid_json_rejected(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[{"image": "1.h5",]')
    with pytest.raises(CaseListError, match="list.json: invalid JSON"):
        load_cases(path)


@pytest.mark.parametrize("content", [{"image": "1.h5"}, "1.h5", 3])
def test_json_not_list_rejected(tmp_path, content):
    with pytest.raises(CaseListError, match="expected a JSON list"):
        load_cases(write_list(tmp_path / "list.json", content))


def test_json_empty_list_rejected(tmp_path):
    with pytest.raises(CaseListError, match="case list is empty"):
        load_cases(write_list(tmp_path / "list.json", []))


def test_duplicate_basenames_rejected(tmp_path, write_h5):
    first = write_h5(tmp_path / "train" / "1.h5", image=IMAGE)
    second = write_h5(tmp_path / "valid" / "1.h5", image=IMAGE)
    third = write_h5(tmp_path / "valid" / "2.h5", image=IMAGE)
    fourth = write_h5(tmp_path / "test" / "2.h5", image=IMAGE)
    unique = write_h5(tmp_path / "test" / "3.h5", image=IMAGE)
    entries = [{"image": str(path)} for path in (first, second, third, fourth, unique)]
    with pytest.raises(CaseListError) as raised:
        load_cases(write_list(tmp_path / "list.json", entries))
    message = str(raised.value)
    assert "2 image basenames occur more than once" in message
    assert f"1.h5: {first}, {second}" in message
    assert f"2.h5: {third}, {fourth}" in message
    assert "3.h5" not in message


def test_non_ascii_names(tmp_path, write_h5):
    image = write_h5(tmp_path / "图像" / "病例_01.h5", image=IMAGE)
    cases = load_cases(write_list(tmp_path / "列表.json", [{"image": "图像/病例_01.h5"}]))
    assert cases[0].name == "病例_01.h5"
    assert cases[0].image == image


def test_json_with_bom_parsed(tmp_path, write_h5):
    image = write_h5(tmp_path / "1.h5", image=IMAGE)
    path = tmp_path / "list.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"image": "1.h5"}]).encode("utf-8"))
    cases = load_cases(path)
    assert [case.image for case in cases] == [image]


def test_same_image_listed_twice_kept_once(tmp_path, write_h5, caplog):
    image = write_h5(tmp_path / "1.h5", image=IMAGE)
    other = write_h5(tmp_path / "2.h5", image=IMAGE)
    entries = [{"image": "1.h5"}, {"image": str(image)}, {"image": "2.h5"}]
    cases = load_cases(write_list(tmp_path / "list.json", entries))
    assert [case.image for case in cases] == [tmp_path / "1.h5", other]
    assert "1.h5 is listed 2 times with the same label and view" in caplog.text


def test_same_image_with_other_view_rejected(tmp_path, write_h5):
    write_h5(tmp_path / "1.h5", image=IMAGE)
    entries = [{"image": "1.h5", "view_id": 1}, {"image": "1.h5", "view_id": 2}]
    with pytest.raises(CaseListError, match="1 image basenames occur more than once"):
        load_cases(write_list(tmp_path / "list.json", entries))


def test_overlong_path_reported(tmp_path, write_h5):
    write_h5(tmp_path / "1.h5", image=IMAGE)
    entries = [{"image": "a" * 300 + ".h5"}, {"image": "1.h5"}]
    with pytest.raises(CaseListError) as raised:
        load_cases(write_list(tmp_path / "list.json", entries))
    message = str(raised.value)
    assert "1 of 2 entries are invalid" in message
    assert "entry 0: image 'aaa" in message
