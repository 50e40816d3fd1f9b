"""Label names, colours, the user's label selection and remapping (numpy and in a MONAI pipeline)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped

from mimcore.data.labels import (Label, RemapLabelsd, default_color, labels_from_names, parse_label_selection,
                                 remap_array, to_label_array)
from mimcore.errors import MimError

TOTALSEG = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
            7: "pancreas", 10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left", 12: "lung_upper_lobe_right",
            13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right", 27: "vertebrae_L5", 28: "vertebrae_L4",
            52: "aorta", 63: "inferior_vena_cava", 92: "rib_left_1", 93: "rib_left_2"}


def test_label_dict_round_trip_and_validation():
    label = Label(5, "liver", (221, 130, 101))
    assert label.to_dict() == {"value": 5, "name": "liver", "color": [221, 130, 101]}
    assert Label.from_dict(label.to_dict()) == label
    assert Label.from_dict({"value": 2, "name": "spleen"}).color == default_color("spleen", 2)
    assert Label.from_dict({"value": "3", "name": "x", "color": [1, 2, 3]}) == Label(3, "x", (1, 2, 3))
    for bad in ({"value": 0, "name": "bg"}, {"value": -1, "name": "x"}, {"value": 1.5, "name": "x"},
                {"value": 70000, "name": "x"}, {"value": 1, "name": "x", "color": [1, 2]},
                {"value": 1, "name": "x", "color": [0, 0, 256]}, {"name": "no value"}, [1, "liver"]):
        with pytest.raises(MimError):
            Label.from_dict(bad)


def test_default_colors_are_anatomical_for_known_organs_and_distinct_otherwise():
    assert default_color("liver", 1) == (221, 130, 101)
    assert default_color("kidney_left", 3) == default_color("kidney_right", 2) == default_color("Kidney Left", 9)
    assert default_color("aorta", 52)[0] > 200 > default_color("aorta", 52)[2]  # arteries red
    assert default_color("inferior_vena_cava", 63)[2] > 150  # veins blue
    lobes = {default_color(name, v) for v, name in TOTALSEG.items() if name.startswith("lung")}
    assert len(lobes) == 3  # upper, middle, lower differ; left/right share
    assert default_color("vertebrae_L5", 27) != default_color("vertebrae_L4", 28)  # neighbours differ
    assert default_color("rib_left_1", 92) != default_color("rib_left_2", 93)
    # unknown names: deterministic, valid, and distinct for neighbouring values
    unknown = [default_color("thing", v) for v in range(1, 30)]
    assert unknown == [default_color("other", v) for v in range(1, 30)]
    assert len(set(unknown)) == len(unknown)
    assert all(0 <= c <= 255 for rgb in unknown for c in rgb)
    for v in range(1, 29):  # consecutive values far apart in colour
        assert np.abs(np.subtract(unknown[v - 1], unknown[v])).sum() > 60


def test_labels_from_names():
    labels = labels_from_names(["liver", "spleen"])
    assert [(x.value, x.name) for x in labels] == [(1, "liver"), (2, "spleen")]
    labels = labels_from_names({5: "liver", "1": "spleen"})
    assert [(x.value, x.name, x.color) for x in labels] == [(1, "spleen", default_color("spleen", 1)),
                                                          (5, "liver", (221, 130, 101))]
    with pytest.raises(MimError, match="used for both"):
        labels_from_names({1: "liver", 2: "liver"})
    with pytest.raises(MimError):
        labels_from_names({0: "background"})


def test_parse_label_selection_forms():
    assert parse_label_selection("liver,spleen,kidney_left", TOTALSEG) == {5: 1, 1: 2, 3: 3}
    assert parse_label_selection(" Liver , SPLEEN ", TOTALSEG) == {5: 1, 1: 2}  # case and spaces ignored
    assert parse_label_selection("5,1,2", TOTALSEG) == {5: 1, 1: 2, 2: 3}
    assert parse_label_selection("5:1,1:2,2:2", TOTALSEG) == {5: 1, 1: 2, 2: 2}  # merge kidneys... and spleen
    assert parse_label_selection("kidney_left:3,kidney_right:3,liver:1", TOTALSEG) == {3: 3, 2: 3, 5: 1}
    assert parse_label_selection("5,spleen", TOTALSEG) == {5: 1, 1: 2}


@pytest.mark.parametrize("spec, message", [
    ("livr,spleen", r"Unknown label name 'livr'.*Did you mean 'liver'.*Available labels: 1:spleen"),
    ("kidney_lft", r"Did you mean 'kidney_left'"),
    ("xyzzy", r"Unknown label name 'xyzzy' in 'xyzzy'\. Available labels"),
    ("8", r"Label value 8 .* not one of the available labels"),
    ("5:0", r"new value '0' must be an integer from 1 to 65535"),
    ("5:x", r"new value 'x'"),
    ("5,liver", r"Label 5 \(liver\) is given twice"),
    ("5:1,1", r"mixes 'old:new' pairs with plain labels"),
    ("5,,1", r"empty entry"),
    ("", r"selection is empty"),
])
def test_parse_label_selection_errors(spec, message):
    with pytest.raises(MimError, match=message):
        parse_label_selection(spec, TOTALSEG)


def test_remap_array_matches_a_voxel_by_voxel_mapping():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 120, size=(20, 21, 22)).astype(np.uint8)
    mapping = {5: 1, 1: 2, 3: 2, 117: 4}
    out = remap_array(labels, mapping)
    expected = np.vectorize(lambda v: mapping.get(int(v), 0))(labels)
    assert out.dtype == np.uint8 and out.shape == labels.shape
    np.testing.assert_array_equal(out, expected)
    # floats holding whole numbers (as load_volume returns) and wide outputs
    out = remap_array(labels.astype(np.float32), {5: 300, 1: 2})
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, np.where(labels == 5, 300, np.where(labels == 1, 2, 0)))
    # mapping keys larger than any value in the array are harmless
    np.testing.assert_array_equal(remap_array(np.array([[0, 1]], dtype=np.int64), {1: 7, 60000: 1}), [[0, 7]])


def test_remap_array_refuses_non_label_maps():
    with pytest.raises(MimError, match="non-integer values"):
        remap_array(np.array([0.0, 0.5, 1.0]), {1: 1})
    with pytest.raises(MimError, match="non-integer"):
        remap_array(np.array([0.0, np.nan]), {1: 1})
    with pytest.raises(MimError, match="negative"):
        remap_array(np.array([-1, 0, 1]), {1: 1})
    with pytest.raises(MimError, match="up to 70000"):
        to_label_array(np.array([0, 70000]))
    with pytest.raises(MimError, match="old values must be >= 0"):
        remap_array(np.array([0, 1]), {-1: 1})


def test_remap_array_is_fast_on_a_ct_sized_label_map():
    labels = np.zeros((512, 512, 400), dtype=np.uint8)
    labels[100:300, 100:300, 50:350] = 5
    labels[300:400, 100:200, 100:200] = 1
    start = time.perf_counter()
    out = remap_array(labels, {5: 1, 1: 2})
    elapsed = time.perf_counter() - start
    assert int(out[200, 200, 200]) == 1 and int(out[350, 150, 150]) == 2 and int(out[0, 0, 0]) == 0
    assert elapsed < 5.0, f"remap of 512x512x400 took {elapsed:.1f} s"


def test_remap_labels_transform_in_a_monai_pipeline_keeps_metadata():
    affine = torch.tensor([[0.0, 0.0, -2.5, 5.0], [-0.8, 0.0, 0.0, -7.0], [0.0, -1.3, 0.0, 11.0], [0, 0, 0, 1.0]],
                          dtype=torch.float64)
    label = torch.tensor([[[[0, 1], [5, 3]], [[5, 5], [2, 0]]]], dtype=torch.float32)  # (1, 2, 2, 2)
    data = {"image": torch.zeros(1, 2, 2, 2),
            "label": MetaTensor(label, affine=affine, meta={"filename_or_obj": "case1_label.nii.gz"})}
    pipeline = Compose([EnsureTyped(keys=["image", "label"]), RemapLabelsd(keys="label", mapping={5: 1, 1: 2, 2: 2})])
    out = pipeline(data)["label"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    torch.testing.assert_close(out.affine, affine)
    assert out.meta["filename_or_obj"] == "case1_label.nii.gz"
    expected = torch.tensor([[[[0, 2], [1, 0]], [[1, 1], [2, 0]]]], dtype=torch.float32)
    torch.testing.assert_close(out.as_tensor(), expected)
    # numpy input, an integer tensor too narrow for the new values, and a missing key
    assert RemapLabelsd("l", {1: 2})({"l": np.array([0, 1])})["l"].tolist() == [0, 2]
    narrow = RemapLabelsd("l", {1: 300})({"l": torch.tensor([0, 1], dtype=torch.uint8)})["l"]
    assert narrow.dtype == torch.int32 and narrow.tolist() == [0, 300]
    assert RemapLabelsd("l", {1: 2}, allow_missing_keys=True)({"x": 1}) == {"x": 1}
