"""A model as a radiologist reads it, and an empty library that says what to do (issue 13):
the details text of a library entry read from a real model.json, and the first-run guidance."""

from __future__ import annotations

import json

from MiMSlicerLib import library
from MiMSlicerLib.modelinfo import NO_LICENSE, empty_library_guidance, label_lines, model_details


def _bundle(folder, **extra):
    folder.mkdir(parents=True)
    description = {
        "format": "mimcore.bundle.v1", "name": "Abdomen CT (v2)",
        "architecture": {"kind": "mim-seg", "preset": "small"},
        "labels": [{"value": 1, "name": "liver", "color": [221, 130, 101],
                    "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"],
                                    "type": ["SCT", "10200004", "Liver"]}},
                   {"value": 2, "name": "spleen", "color": [157, 108, 162]}],
        "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "hu_min": -175.0, "hu_max": 250.0},
        "inference": {"roi_size": [96, 96, 96], "overlap": 0.5},
        "training": {"datalist": "btcv.json", "init": "mim-pretrain-1k", "steps": 20000, "best_dice": 0.8123456,
                     "created": "2026-11-30T10:00:00", "lr": 1e-4},
        "weights": {"file": "weights.safetensors", "sha256": "0" * 64, "size": 150 * 1024 * 1024},
    }
    description.update(extra)
    (folder / "model.json").write_text(json.dumps(description))
    return library.read_model(folder)


def test_details_show_labels_input_size_provenance_and_licence(tmp_path):
    entry = _bundle(tmp_path / "abdomen", license="CC-BY-NC-4.0 (research use only)")
    text = model_details(entry)
    lines = text.splitlines()
    assert lines[0] == "abdomen - Abdomen CT (v2)"
    assert lines[1] == "Labels (2): 1 liver (SCT 10200004 Liver); 2 spleen"
    assert lines[2] == "Input spacing: 1.5 x 1.5 x 2 mm (orientation RAS, intensity window -175 to 250 HU)"
    assert lines[3] == "Size: mim-seg, size small, weights 150.0 MiB, patch 96 x 96 x 96 voxels"
    assert lines[4] == ("Training: datalist btcv.json; init mim-pretrain-1k; steps 20000; best_dice 0.8123; "
                        "created 2026-11-30T10:00:00")
    assert lines[5] == "Licence: CC-BY-NC-4.0 (research use only)"
    assert lines[6] == f"Folder: {tmp_path / 'abdomen'}"


def test_missing_facts_are_said_to_be_missing(tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"name": "bare", "labels": [{"value": 1, "name": "lesion"}]}))
    text = model_details(library.read_model(folder))
    assert "Input spacing: not stated (the volume's own)" in text
    assert "Training: no provenance in model.json" in text
    assert f"Licence: {NO_LICENSE}" in text


def test_a_broken_entry_says_why(tmp_path):
    (tmp_path / "lib" / "broken").mkdir(parents=True)
    (tmp_path / "lib" / "broken" / "model.json").write_text("{not json")
    entry = library.list_models(tmp_path / "lib")[0]
    text = model_details(entry)
    assert text.startswith("broken: this library entry cannot be used.\n") and "not valid JSON" in text


def test_label_lines_read_slicers_terminology_string_too(tmp_path):
    entry = {"label_table": [{"value": 3, "name": "kidney", "terminology":
             "ctx~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney~^^~region~^^~^^"}]}
    assert label_lines(entry) == ["3 kidney (SCT 64033007 Kidney)"]


def test_an_empty_library_offers_the_three_ways_forward(tmp_path):
    text = empty_library_guidance(tmp_path / "models")
    lines = text.splitlines()
    assert lines[0] == f"No segmentation model yet: the model library ({tmp_path / 'models'}) is empty. To get one:"
    assert [line.split(" - ")[0] for line in lines[1:]] == ["1. Add from file...", "2. Add from registry...",
                                                            "3. Fine-tune (section below)"]
    assert "a model registry (a JSON file or web address you are given)" in text
    assert "the registry https://example.org/models.json" in empty_library_guidance(
        None, "https://example.org/models.json")
