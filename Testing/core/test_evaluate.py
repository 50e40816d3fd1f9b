"""``mim evaluate`` and :mod:`mimcore.evaluation`: numbers checked against values worked out by hand
(or by an independent brute-force surface distance), the absent-class statuses and their
summary counts, grid checks, file pairing, and the CLI as a real subprocess on NIfTI files.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from mimcore.cli.evaluate_cmd import case_key, pair_files
from mimcore.cli.main import main
from mimcore.data.labels import Label, labels_from_names
from mimcore.data.segfile import save_seg_nrrd
from mimcore.data.volume_io import save_volume
from mimcore.errors import MimError
from mimcore.evaluation.metrics import evaluate_case, evaluate_files, summarize
from mimcore.evaluation.report import csv_text, format_summary, write_csv, write_json

LABELS = labels_from_names({1: "liver", 2: "spleen", 3: "kidney_left"})


def _row(rows, value):
    return next(r for r in rows if r["value"] == value)


# ----------------------------------------------------------------------------- metrics by hand

def test_dice_of_two_overlapping_cubes():
    pred = np.zeros((12, 12, 12), np.uint8)
    ref = np.zeros_like(pred)
    pred[2:6, 2:6, 2:6] = 1  # 4x4x4 = 64 voxels
    ref[3:7, 2:6, 2:6] = 1  # shifted by one along x: overlap 3x4x4 = 48
    row = _row(evaluate_case(pred, ref, (1.0, 1.0, 1.0), LABELS), 1)
    assert row["status"] == "ok"
    assert row["dice"] == pytest.approx(2 * 48 / (64 + 64))  # 0.75
    assert row["pred_voxels"] == row["ref_voxels"] == 64


def test_hd95_on_anisotropic_spacing_for_shifted_sheets():
    """One-voxel-thick sheets: every voxel is a surface voxel and its nearest partner is straight
    across, so every surface distance is the shift times that axis' spacing."""
    spacing = (2.5, 0.8, 1.2)
    pred = np.zeros((12, 14, 10), np.uint8)
    ref = np.zeros_like(pred)
    pred[3, 2:10, 2:8] = 1
    ref[5, 2:10, 2:8] = 1  # 2 voxels along x at 2.5 mm -> 5 mm
    pred[1:9, 4, 8:10] = 2
    ref[1:9, 7, 8:10] = 2  # 3 voxels along y at 0.8 mm -> 2.4 mm
    pred[2:6, 10:13, 3] = 3
    ref[2:6, 10:13, 7] = 3  # 4 voxels along z at 1.2 mm -> 4.8 mm
    rows = evaluate_case(pred, ref, spacing, LABELS)
    assert [r["hd95_mm"] for r in rows] == [pytest.approx(5.0), pytest.approx(2.4), pytest.approx(4.8)]
    assert all(r["dice"] == 0.0 and r["status"] == "ok" for r in rows)  # no overlap but both present
    assert _row(rows, 1)["pred_volume_ml"] == pytest.approx(8 * 6 * 2.5 * 0.8 * 1.2 / 1000)


def test_hd95_takes_the_95th_percentile_not_the_maximum():
    """Reference: a 4x4 sheet at x=2. Prediction: the same sheet plus a line at x=5..9 above it.
    Prediction->reference distances: 16 zeros and 3,4,5,6,7 voxels x 2.5 mm. With 21 values the
    95th percentile (linear) sits exactly at sorted index 0.95 * 20 = 19: 6 voxels = 15 mm.
    Reference->prediction: all 0. HD95 = max(15, 0) = 15 mm (the maximum would be 17.5)."""
    pred = np.zeros((12, 8, 8), np.uint8)
    ref = np.zeros_like(pred)
    ref[2, 2:6, 2:6] = 1
    pred[2, 2:6, 2:6] = 1
    pred[5:10, 3, 3] = 1
    row = _row(evaluate_case(pred, ref, (2.5, 1.0, 1.0), LABELS), 1)
    assert row["hd95_mm"] == pytest.approx(15.0)
    assert row["dice"] == pytest.approx(2 * 16 / (21 + 16))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a 6-neighbour outside it (outside the array counts as outside)."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def _hd95_brute_force(a: np.ndarray, b: np.ndarray, spacing) -> float:
    pa = np.argwhere(_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(_surface(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_matches_an_independent_brute_force_on_irregular_shapes():
    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (18, 16, 14)], indexing="ij"), -1).astype(float)
    spacing = (0.7, 1.9, 3.1)
    for trial in range(3):
        centre_a, centre_b = rng.uniform(5, 9, 3), rng.uniform(5, 9, 3)
        radii_a, radii_b = rng.uniform(2.5, 5, 3), rng.uniform(2.5, 5, 3)
        a = (((grid - centre_a) / radii_a) ** 2).sum(-1) <= 1
        b = (((grid - centre_b) / radii_b) ** 2).sum(-1) <= 1
        b[rng.integers(0, 18), rng.integers(0, 16), rng.integers(0, 14)] = True  # a stray voxel
        row = _row(evaluate_case(a.astype(np.uint8), b.astype(np.uint8), spacing, LABELS), 1)
        assert row["hd95_mm"] == pytest.approx(_hd95_brute_force(a, b, spacing), rel=1e-5), trial
        assert row["dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), rel=1e-6)


def test_absent_missing_and_false_positive_classes():
    pred = np.zeros((10, 10, 10), np.uint8)
    ref = np.zeros_like(pred)
    ref[2:4, 2:4, 2:4] = 2  # spleen only in the reference
    pred[6:8, 6:8, 6:8] = 3  # kidney only in the prediction
    rows = evaluate_case(pred, ref, (1.0, 2.0, 0.5), LABELS)
    liver, spleen, kidney = rows
    assert liver == {"value": 1, "name": "liver", "status": "absent_in_both", "dice": None, "hd95_mm": None,
                     "pred_voxels": 0, "ref_voxels": 0, "pred_volume_ml": 0.0, "ref_volume_ml": 0.0}
    assert spleen["status"] == "missing_in_prediction" and spleen["dice"] == 0.0 and spleen["hd95_mm"] is None
    assert spleen["ref_volume_ml"] == pytest.approx(8 * 1.0 / 1000)
    assert kidney["status"] == "false_positive" and kidney["dice"] == 0.0 and kidney["hd95_mm"] is None
    assert kidney["pred_voxels"] == 8 and kidney["ref_voxels"] == 0


def test_summary_counts_what_each_mean_is_over():
    """Three cases, worked by hand. liver: ok (Dice 0.75, HD95 1), ok (Dice 1, HD95 0), absent.
    spleen: ok (Dice 1, HD95 0), missing, ok (Dice 1, HD95 0). kidney: false positive once, else absent."""
    def case(liver_shift, liver_present, spleen_present, kidney_fp):
        pred = np.zeros((12, 12, 12), np.uint8)
        ref = np.zeros_like(pred)
        if liver_present:
            ref[2:6, 2:6, 2:6] = 1
            pred[2 + liver_shift:6 + liver_shift, 2:6, 2:6] = 1
        if spleen_present is not None:
            ref[8:10, 8:10, 8:10] = 2
            if spleen_present:
                pred[8:10, 8:10, 8:10] = 2
        if kidney_fp:
            pred[0, 0, 0] = 3
        return evaluate_case(pred, ref, (1.0, 1.0, 1.0), LABELS)

    rows = case(1, True, True, False) + case(0, True, False, True) + case(0, False, True, False)
    liver, spleen, kidney = summarize(rows, LABELS)
    assert liver["dice"]["mean"] == pytest.approx((0.75 + 1.0) / 2)
    assert liver["dice"]["std"] == pytest.approx(0.125)  # population std of {0.75, 1}
    assert liver["dice"]["n"] == 2 and liver["dice"]["excluded"] == {"absent_in_both": 1}
    assert liver["hd95_mm"]["mean"] == pytest.approx(0.5) and liver["hd95_mm"]["n"] == 2
    assert spleen["dice"]["mean"] == pytest.approx(2 / 3) and spleen["dice"]["n"] == 3  # the miss counts as 0
    assert spleen["hd95_mm"]["n"] == 2
    assert spleen["hd95_mm"]["excluded"] == {"missing_in_prediction": 1, "false_positive": 0, "absent_in_both": 0}
    assert kidney["dice"] == {"mean": 0.0, "std": 0.0, "n": 1, "excluded": {"absent_in_both": 2}}
    assert kidney["hd95_mm"]["mean"] is None and kidney["hd95_mm"]["n"] == 0
    assert kidney["status_counts"] == {"ok": 0, "missing_in_prediction": 0, "false_positive": 1,
                                       "absent_in_both": 2}


def test_evaluate_case_input_errors():
    with pytest.raises(MimError, match="same shape"):
        evaluate_case(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1), LABELS)
    with pytest.raises(MimError, match="spacing must be three positive"):
        evaluate_case(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1), LABELS)
    with pytest.raises(MimError, match="non-integer"):
        evaluate_case(np.full((4, 4, 4), 0.5), np.zeros((4, 4, 4)), (1, 1, 1), LABELS)


# ----------------------------------------------------------------------------- files

def _affine(spacing=(0.8, 1.1, 2.5), origin=(-40.0, 25.0, 60.0)) -> np.ndarray:
    """An oblique, LPS-like (x flipped, y flipped) grid."""
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _case_arrays(shift: int):
    pred = np.zeros((16, 14, 10), np.uint8)
    ref = np.zeros_like(pred)
    ref[3:7, 3:7, 2:6] = 1
    pred[3 + shift:7 + shift, 3:7, 2:6] = 1  # liver: Dice (64 - 16 * shift) * 2 / 128
    ref[10, 2:10, 2:8] = 2
    pred[12, 2:10, 2:8] = 2  # spleen: sheets 2 voxels apart along x (0.8 mm): HD95 1.6 mm, Dice 0
    return pred, ref


def _write_cases(tmp_path, affine=None):
    affine = _affine() if affine is None else affine
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    for case_id, shift in (("case_a", 0), ("case_b", 1)):
        pred, ref = _case_arrays(shift)
        save_volume(tmp_path / "pred" / f"{case_id}.nii.gz", pred, affine, dtype=np.uint8)
        save_volume(tmp_path / "ref" / f"{case_id}.nii.gz", ref, affine, dtype=np.uint8)
    return tmp_path / "pred", tmp_path / "ref"


def test_evaluate_files_on_nifti_files(tmp_path):
    pred_dir, ref_dir = _write_cases(tmp_path)
    pairs = pair_files(pred_dir, ref_dir)
    assert [p[2] for p in pairs] == ["case_a", "case_b"]
    result = evaluate_files(pairs, labels_from_names({1: "liver", 2: "spleen", 3: "kidney_left"}))
    liver, spleen, kidney = result.summary
    assert liver["dice"]["mean"] == pytest.approx((1.0 + 0.75) / 2) and liver["dice"]["n"] == 2
    assert liver["hd95_mm"]["mean"] == pytest.approx((0.0 + 0.8) / 2)  # one voxel along x = 0.8 mm
    assert spleen["hd95_mm"]["mean"] == pytest.approx(1.6) and spleen["dice"]["mean"] == 0.0
    assert kidney["dice"]["n"] == 0 and kidney["status_counts"]["absent_in_both"] == 2
    assert _row(result.cases[0].rows, 1)["ref_volume_ml"] == pytest.approx(64 * 0.8 * 1.1 * 2.5 / 1000)
    # default labels: the values present, named label_<v>
    result = evaluate_files(pairs)
    assert [(label.value, label.name) for label in result.labels] == [(1, "label_1"), (2, "label_2")]
    # a label list without spleen: spleen is ignored with a note
    result = evaluate_files(pairs, [Label(1, "liver", (221, 130, 101))])
    assert [s["name"] for s in result.summary] == ["liver"]
    assert result.notes == ["label values not in the label list were ignored: 2 (in 2 cases)"]
    # remapping the reference: its 1 becomes 2 and its 2 is dropped
    result = evaluate_files(pairs[:1], labels_from_names({1: "liver", 2: "spleen"}), label_map_ref={1: 2})
    rows = result.cases[0].rows
    assert _row(rows, 1)["status"] == "false_positive" and _row(rows, 2)["ref_voxels"] == 64


def test_evaluate_files_reads_seg_nrrd_references_with_their_names(tmp_path):
    pred, ref = _case_arrays(1)
    save_volume(tmp_path / "p.nii.gz", pred, _affine(), dtype=np.uint8)
    save_seg_nrrd(tmp_path / "r.seg.nrrd", ref, _affine(), labels_from_names({1: "liver", 2: "spleen"}))
    result = evaluate_files([(tmp_path / "p.nii.gz", tmp_path / "r.seg.nrrd", "p")])
    assert [(s["name"], s["dice"]["mean"]) for s in result.summary] == [("liver", pytest.approx(0.75)),
                                                                        ("spleen", 0.0)]


@pytest.mark.parametrize("change, message", [
    (lambda a: a @ np.diag([1.0, 1.0, 1.0 + 1e-3, 1.0]), r"spacing \[0\.8, 1\.1, 2\.5025\] vs \[0\.8, 1\.1, 2\.5\] mm"),
    (lambda a: a + np.pad(np.array([[0, 0, 0, 0.5]]), ((2, 1), (0, 0))), r"origin \(RAS\)"),
    (lambda a: a @ np.diag([-1.0, 1.0, 1.0, 1.0]), r"axis directions differ"),
])
def test_grid_mismatch_is_a_clear_error(tmp_path, change, message):
    pred, ref = _case_arrays(0)
    save_volume(tmp_path / "p.nii.gz", pred, change(_affine()), dtype=np.uint8)
    save_volume(tmp_path / "r.nii.gz", ref, _affine(), dtype=np.uint8)
    with pytest.raises(MimError, match=f"not on the same voxel grid: {message}.*--resample-ref"):
        evaluate_files([(tmp_path / "p.nii.gz", tmp_path / "r.nii.gz", "p")], LABELS)


def test_resample_ref_moves_the_reference_onto_the_prediction_grid(tmp_path):
    """A reference stored with its rows flipped, or at half the voxel size, holds the same
    labels in the same places: with resample_ref it scores exactly as the same-grid one."""
    pred, ref = _case_arrays(1)
    a = _affine()
    save_volume(tmp_path / "p.nii.gz", pred, a, dtype=np.uint8)
    save_volume(tmp_path / "r.nii.gz", ref, a, dtype=np.uint8)
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1.0, ref.shape[1] - 1  # index j of the file is row ny-1-j of the grid
    save_volume(tmp_path / "flipped.nii.gz", ref[:, ::-1, :], a @ flip, dtype=np.uint8)
    fine = a.copy()
    fine[:3, :3] = a[:3, :3] / 2  # voxel 2i and 2i+1 centred at a @ (i -/+ 0.25)
    fine[:3, 3] = a[:3, 3] + a[:3, :3] @ np.full(3, -0.25)
    save_volume(tmp_path / "fine.nii.gz", ref.repeat(2, 0).repeat(2, 1).repeat(2, 2), fine, dtype=np.uint8)
    expected = evaluate_files([(tmp_path / "p.nii.gz", tmp_path / "r.nii.gz", "p")], LABELS)
    assert expected.notes == [] and _row(expected.cases[0].rows, 1)["dice"] == pytest.approx(0.75)
    for name in ("flipped", "fine"):
        pair = [(tmp_path / "p.nii.gz", tmp_path / f"{name}.nii.gz", "p")]
        with pytest.raises(MimError, match="--resample-ref"):
            evaluate_files(pair, LABELS)
        result = evaluate_files(pair, LABELS, resample_ref=True)
        assert result.cases[0].rows == expected.cases[0].rows, name
        assert result.notes == ["reference resampled onto the prediction's grid (nearest neighbour, world space) "
                                "for 1 case(s): p"]
    part = a.copy()
    part[:3, 3] += a[:3, :3] @ np.array([10.0, 0.0, 0.0])  # 10 voxels along i: spleen and 1/4 of liver leave
    save_volume(tmp_path / "part.nii.gz", ref, part, dtype=np.uint8)
    result = evaluate_files([(tmp_path / "p.nii.gz", tmp_path / "part.nii.gz", "p")], LABELS, resample_ref=True)
    assert result.notes[1] == ("p: 57% of the reference's labelled volume was lost when it was moved onto the "
                               "prediction's grid (it lies outside that grid, or is thinner than its voxels); its "
                               "scores cover the rest only")  # (16 + 48) of 112 voxels
    assert _row(result.cases[0].rows, 1)["ref_voxels"] == 48
    far = a.copy()
    far[:3, 3] += 500.0
    save_volume(tmp_path / "far.nii.gz", ref, far, dtype=np.uint8)
    with pytest.raises(MimError, match="does not overlap the prediction"):
        evaluate_files([(tmp_path / "p.nii.gz", tmp_path / "far.nii.gz", "p")], LABELS, resample_ref=True)


def test_shape_mismatch_and_non_label_files(tmp_path):
    save_volume(tmp_path / "p.nii.gz", np.zeros((8, 8, 8), np.uint8), _affine(), dtype=np.uint8)
    save_volume(tmp_path / "r.nii.gz", np.zeros((8, 8, 9), np.uint8), _affine(), dtype=np.uint8)
    save_volume(tmp_path / "ct.nii.gz", np.full((8, 8, 8), -12.5, np.float32), _affine())
    with pytest.raises(MimError, match=r"shape \(8, 8, 8\) vs \(8, 8, 9\)"):
        evaluate_files([(tmp_path / "p.nii.gz", tmp_path / "r.nii.gz", "p")], LABELS)
    with pytest.raises(MimError, match=r"ct\.nii\.gz: The label map holds non-integer values"):
        evaluate_files([(tmp_path / "ct.nii.gz", tmp_path / "p.nii.gz", "p")], LABELS)


def test_pairing(tmp_path):
    assert case_key(tmp_path / "case1.nii.gz") == case_key(tmp_path / "case1.seg.nrrd") == "case1"
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        (tmp_path / "p" / name).write_bytes(b"")
    for name in ("a.nrrd", "b.seg.nrrd", "d.mha", "notes.txt"):
        (tmp_path / "r" / name).write_bytes(b"")
    with pytest.raises(MimError, match=r"1 prediction\(s\) in .* have no reference .*: c\.nii\.gz; "
                                       r"1 reference\(s\) in .* have no prediction .*: d\.mha"):
        pair_files(tmp_path / "p", tmp_path / "r")
    (tmp_path / "p" / "c.nii.gz").unlink()
    (tmp_path / "r" / "d.mha").unlink()
    assert [(p.name, r.name, k) for p, r, k in pair_files(tmp_path / "p", tmp_path / "r")] == [
        ("a.nii.gz", "a.nrrd", "a"), ("b.nii.gz", "b.seg.nrrd", "b")]
    (tmp_path / "p" / "a.nrrd").write_bytes(b"")
    with pytest.raises(MimError, match="two files for case 'a'"):
        pair_files(tmp_path / "p", tmp_path / "r")
    with pytest.raises(MimError, match="both be files or both be folders"):
        pair_files(tmp_path / "p" / "b.nii.gz", tmp_path / "r")
    with pytest.raises(MimError, match="--ref: no such file or folder"):
        pair_files(tmp_path / "p", tmp_path / "missing")


def test_reports_are_strict_json_and_csv_without_nan(tmp_path):
    pred_dir, ref_dir = _write_cases(tmp_path)
    result = evaluate_files(pair_files(pred_dir, ref_dir), LABELS)
    write_json(tmp_path / "out" / "e.json", result)
    write_csv(tmp_path / "out" / "e.csv", result)
    text = (tmp_path / "out" / "e.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["cases"][0]["classes"][2]["dice"] is None
    rows = list(csv.DictReader(open(tmp_path / "out" / "e.csv")))
    assert len(rows) == 6 and rows[2]["status"] == "absent_in_both" and rows[2]["dice"] == ""
    assert csv_text(result) == (tmp_path / "out" / "e.csv").read_text(encoding="utf-8")
    table = format_summary(result)
    assert "1 liver" in table and "0.8750 ± 0.1250 (2)" in table and "0.40 ± 0.40 (2)" in table


# ----------------------------------------------------------------------------- the command line

def _mim(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mimcore", "evaluate", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_cli_on_folders_with_a_labels_file(tmp_path):
    pred_dir, ref_dir = _write_cases(tmp_path)
    labels_json = tmp_path / "labels.json"
    labels_json.write_text(json.dumps([{"value": 1, "name": "liver", "color": [221, 130, 101]},
                                       {"value": 2, "name": "spleen", "color": [157, 108, 162]}]))
    proc = _mim("--pred", pred_dir, "--ref", ref_dir, "--labels", labels_json, "--out", tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "1 liver" in proc.stdout and "2 spleen" in proc.stdout and "0.8750 ± 0.1250 (2)" in proc.stdout
    rows = list(csv.DictReader(open(tmp_path / "eval" / "evaluation.csv")))
    assert [(r["case_id"], r["name"], r["status"]) for r in rows] == [
        ("case_a", "liver", "ok"), ("case_a", "spleen", "ok"), ("case_b", "liver", "ok"), ("case_b", "spleen", "ok")]
    assert float(rows[2]["dice"]) == pytest.approx(0.75) and float(rows[1]["hd95_mm"]) == pytest.approx(1.6)
    assert float(rows[0]["ref_volume_ml"]) == pytest.approx(64 * 0.8 * 1.1 * 2.5 / 1000)
    data = json.loads((tmp_path / "eval" / "evaluation.json").read_text(encoding="utf-8"))
    assert data["labels"][0] == {"value": 1, "name": "liver", "color": [221, 130, 101]}
    assert data["summary"][0]["dice"]["mean"] == pytest.approx(0.875)
    assert data["summary"][1]["hd95_mm"] == {"mean": pytest.approx(1.6), "std": pytest.approx(0.0), "n": 2,
                                             "excluded": {"missing_in_prediction": 0, "false_positive": 0,
                                                          "absent_in_both": 0}}
    assert [c["case_id"] for c in data["cases"]] == ["case_a", "case_b"]


def test_cli_errors_exit_2_with_a_clear_message(tmp_path):
    pred_dir, ref_dir = _write_cases(tmp_path)
    other = tmp_path / "other_grid"
    other.mkdir()
    for case_id in ("case_a", "case_b"):
        save_volume(other / f"{case_id}.nii.gz", _case_arrays(0)[1], _affine(origin=(-40.0, 25.0, 62.5)),
                    dtype=np.uint8)
    proc = _mim("--pred", pred_dir, "--ref", other)
    assert proc.returncode == 2
    assert "mim: error: Prediction" in proc.stderr and "not on the same voxel grid: origin (RAS)" in proc.stderr
    assert "Traceback" not in proc.stderr and "--resample-ref" in proc.stderr
    proc = _mim("--pred", pred_dir, "--ref", other, "--resample-ref")  # shifted 2.5 mm = one voxel along z
    assert proc.returncode == 0 and "reference resampled onto the prediction's grid" in proc.stderr
    proc = _mim("--pred", pred_dir / "case_a.nii.gz", "--ref", ref_dir / "nothing.nii.gz")
    assert proc.returncode == 2 and "--ref: no such file or folder" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_unpaired_files_exit_2(tmp_path, capsys):
    pred_dir, ref_dir = _write_cases(tmp_path)
    (ref_dir / "case_b.nii.gz").unlink()
    assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir)]) == 2
    err = capsys.readouterr().err
    assert "1 prediction(s) in" in err and "have no reference" in err and "case_b.nii.gz" in err


def test_cli_labels_from_a_model_bundle_and_inline(tmp_path, capsys):
    pred_dir, ref_dir = _write_cases(tmp_path)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.json").write_text(json.dumps({"architecture": {}, "labels": [
        {"value": 1, "name": "liver", "color": [1, 2, 3]}, {"value": 3, "name": "kidney_left", "color": [4, 5, 6]}]}))
    assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--labels", str(bundle),
                 "--json", str(tmp_path / "b.json")]) == 0
    data = json.loads((tmp_path / "b.json").read_text(encoding="utf-8"))
    assert [s["name"] for s in data["summary"]] == ["liver", "kidney_left"]
    assert data["notes"] == ["label values not in the label list were ignored: 2 (in 2 cases)"]
    assert "mim: note: label values not in the label list were ignored" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(pred_dir / "case_b.nii.gz"), "--ref", str(ref_dir / "case_b.nii.gz"),
                 "--labels", "2:Spleen,1:Liver", "--csv", str(tmp_path / "i.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "i.csv")))
    assert [(r["case_id"], r["value"], r["name"]) for r in rows] == [("case_b", "1", "Liver"), ("case_b", "2", "Spleen")]
    assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--labels", "liver"]) == 2
    assert "write value:name pairs" in capsys.readouterr().err
    (tmp_path / "empty_bundle").mkdir()
    assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir),
                 "--labels", str(tmp_path / "empty_bundle")]) == 2
    assert "without model.json" in capsys.readouterr().err
