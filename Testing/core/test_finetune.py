"""The fine-tuning engine on synthetic cases: exact resume, events, bundles, starting from a bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from mimcore.bundles.bundle import load_bundle
from mimcore.cli.main import main
from mimcore.data.volume_io import save_volume


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Two CT-like volumes with a 'liver' ball (1) and a 'spleen' box (2), label maps alongside."""
    root = tmp_path_factory.mktemp("ft_cases")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(40, 36, 24), (36, 40, 22)]):
        x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        ball = (x + 0.3) ** 2 + y**2 + z**2 < 0.25
        box = (np.abs(x - 0.55) < 0.2) & (np.abs(y) < 0.3) & (np.abs(z) < 0.4)
        hu = np.where(ball, 60.0, np.where(box, 120.0, -100.0)) + 10 * rng.standard_normal(shape)
        label = ball * 1 + box * 2
        affine = np.diag([1.5, 1.6, 2.5, 1.0])
        save_volume(root / "images" / f"case{i}.nii.gz", hu.astype(np.float32), affine)
        save_volume(root / "labels" / f"case{i}.nii.gz", label.astype(np.uint8), affine, dtype=np.uint8)
    return root


def finetune(out, cases, *extra, capsys=None):
    rc = main(["finetune", "--images", str(cases / "images"), "--label-dir", str(cases / "labels"),
               "--label-names", "1:liver,2:spleen", "--preset", "tiny", "--spacing", "2", "2", "2",
               "--output", str(out), "--lr", "1e-3", "--warmup-steps", "1", "--progress", "json",
               "--no-tensorboard", "--device", "cpu", *extra])
    events = []
    if capsys is not None:
        events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    return rc, events


def test_resume_is_exact_and_events_carry_loss_dice_eta(tmp_path, cases, capsys):
    rc, events = finetune(tmp_path / "a", cases, "--steps", "4", "--val-every", "2", capsys=capsys)
    assert rc == 0
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("validation") == 2
    progress = [e for e in events if e["event"] == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4]
    assert "loss" in progress[-1]["metrics"] and "dice" in progress[1]["metrics"]
    assert progress[-1]["eta_s"] is not None
    val = [e for e in events if e["event"] == "validation"][0]
    assert set(val["per_class"]) == {"liver", "spleen"}

    rc, _ = finetune(tmp_path / "b", cases, "--steps", "4", "--val-every", "2", "--save-every", "2", capsys=capsys)
    for f in (tmp_path / "b").glob("checkpoint_00000004*"):
        f.unlink()  # interrupted right after step 2
    rc, events = finetune(tmp_path / "b", cases, "--steps", "4", "--val-every", "2", "--resume", capsys=capsys)
    assert rc == 0 and events[0]["event"] == "start" and events[0]["step"] == 2
    wa = load_file(tmp_path / "a" / "checkpoint_00000004.safetensors")
    wb = load_file(tmp_path / "b" / "checkpoint_00000004.safetensors")
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    assert (tmp_path / "a" / "metrics.jsonl").read_text(encoding="utf-8") == (tmp_path / "b" / "metrics.jsonl").read_text(encoding="utf-8")
    assert (tmp_path / "a" / "validation.jsonl").read_text(encoding="utf-8") == (tmp_path / "b" / "validation.jsonl").read_text(encoding="utf-8")
    assert (tmp_path / "a" / "curves.png").stat().st_size > 1000

    bundle = load_bundle(tmp_path / "a" / "model")
    assert [(lab["value"], lab["name"]) for lab in bundle.labels] == [(1, "liver"), (2, "spleen")]
    assert bundle.description["preprocessing"]["spacing"] == [2.0, 2.0, 2.0]
    assert bundle.description["architecture"]["out_channels"] == 3
    best = max(json.loads(ln)["dice"] for ln in (tmp_path / "a" / "validation.jsonl").read_text(encoding="utf-8").splitlines())
    assert bundle.description["training"]["validation_dice"] == pytest.approx(best, abs=1e-4)
    assert bundle.description["training"]["kept"] == "best"


def test_keep_last_holds_the_final_model(tmp_path, cases, capsys):
    """--keep last: the bundle is the last validated model (the final checkpoint's weights),
    whatever the Dice did; the default keeps the best one."""
    rc, events = finetune(tmp_path, cases, "--steps", "4", "--val-every", "1", "--lr", "1e-1", "--keep", "last",
                          capsys=capsys)
    assert rc == 0 and events[-1]["kept"] == "last"
    bundle = load_bundle(tmp_path / "model")
    final = load_file(tmp_path / "checkpoint_00000004.safetensors")
    kept = load_file(next((tmp_path / "model").glob("*.safetensors")))
    assert kept.keys() == final.keys()
    for k in final:
        np.testing.assert_array_equal(kept[k].numpy(), final[k].numpy(), err_msg=k)
    last = json.loads((tmp_path / "validation.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert last["best_step"] < 4 and last["dice"] < last["best_dice"]  # here the best model is not the last one
    training = bundle.description["training"]
    assert training["step"] == 4 and training["kept"] == "last"
    assert training["validation_dice"] == pytest.approx(last["dice"], abs=1e-4)
    with pytest.raises(SystemExit) as exit_info:
        finetune(tmp_path / "x", cases, "--steps", "1", "--keep", "worst")
    assert exit_info.value.code == 2 and "invalid choice: 'worst'" in capsys.readouterr().err


def test_starting_from_a_bundle_keeps_or_replaces_the_head(tmp_path, cases, capsys):
    rc, _ = finetune(tmp_path / "first", cases, "--steps", "1", capsys=capsys)
    assert rc == 0
    rc, events = finetune(tmp_path / "same", cases, "--steps", "1", "--init", str(tmp_path / "first" / "model"),
                          capsys=capsys)
    notes = " ".join(e.get("message", "") for e in events if e["event"] == "note")
    assert rc == 0 and "segmentation bundle" in notes and "output layer is new" not in notes
    rc, events = finetune(tmp_path / "other", cases, "--steps", "1", "--init", str(tmp_path / "first" / "model"),
                          "--labels", "liver", capsys=capsys)
    notes = " ".join(e.get("message", "") for e in events if e["event"] == "note")
    assert rc == 0 and "output layer is new" in notes
    assert load_bundle(tmp_path / "other" / "model").description["architecture"]["out_channels"] == 2


def test_a_given_spacing_or_hu_window_wins_over_the_init_bundles(tmp_path, cases, capsys):
    """Continuing a bundle at another spacing resamples to the spacing given (it was silently
    the bundle's), with a note; without --spacing / --hu-window the bundle's are kept, and a
    note says so."""
    first = tmp_path / "first"
    assert finetune(first, cases, "--steps", "1", capsys=capsys)[0] == 0  # spacing 2 mm, HU -175..250
    rc, events = finetune(tmp_path / "finer", cases, "--steps", "1", "--init", str(first / "model"),
                          "--spacing", "3", "3", "2.5", "--hu-window", "-100", "200", capsys=capsys)
    notes = [e["message"] for e in events if e["event"] == "note"]
    assert rc == 0
    assert "resampling to --spacing 3 x 3 x 2.5 mm, not the --init bundle's 2 x 2 x 2 mm" in notes
    assert "HU window -100..200 (--hu-window), not the --init bundle's -175..250" in notes
    prep = load_bundle(tmp_path / "finer" / "model").description["preprocessing"]
    assert prep["spacing"] == [3.0, 3.0, 2.5] and (prep["hu_min"], prep["hu_max"]) == (-100.0, 200.0)
    rc = main(["finetune", "--images", str(cases / "images"), "--label-dir", str(cases / "labels"),
               "--label-names", "1:liver,2:spleen", "--init", str(tmp_path / "finer" / "model"), "--steps", "1",
               "--output", str(tmp_path / "kept"), "--progress", "json", "--no-tensorboard", "--device", "cpu"])
    events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    notes = [e["message"] for e in events if e["event"] == "note"]
    assert rc == 0
    assert "from the --init bundle: spacing 3 x 3 x 2.5 mm and HU window -100..200 (--spacing / --hu-window " \
           "change them)" in notes
    rc, events = finetune(tmp_path / "hu", cases, "--steps", "1", "--init", str(tmp_path / "finer" / "model"),
                          "--spacing", "4", "4", "4", capsys=capsys)
    notes = [e["message"] for e in events if e["event"] == "note"]
    assert "from the --init bundle: HU window -100..200 (--hu-window changes it)" in notes
    assert "resampling to --spacing 4 x 4 x 4 mm, not the --init bundle's 3 x 3 x 2.5 mm" in notes
    assert load_bundle(tmp_path / "kept" / "model").description["preprocessing"] == prep


def test_datalist_label_colours_reach_the_bundle(tmp_path, cases, capsys):
    """A datalist's labels may carry colours ([{"value", "name", "color"}]); they follow
    --labels renumbering into the bundle, and a label without one gets its default."""
    from mimcore.data.labels import default_color

    datalist = tmp_path / "cases.json"
    datalist.write_text(json.dumps({
        "labels": [{"value": "0", "name": "background"}, {"value": 1, "name": "liver", "color": [10, 20, 30]},
                   {"value": 2, "name": "spleen"}],
        "training": [{"image": str(cases / "images" / f"case{i}.nii.gz"),
                      "label": str(cases / "labels" / f"case{i}.nii.gz")} for i in range(2)]}), encoding="utf-8")
    rc = main(["finetune", "--datalist", str(datalist), "--labels", "spleen,liver", "--preset", "tiny",
               "--spacing", "2", "2", "2", "--steps", "1", "--output", str(tmp_path / "run"), "--progress", "none",
               "--no-tensorboard", "--device", "cpu"])
    assert rc == 0
    labels = load_bundle(tmp_path / "run" / "model").labels
    assert [(lab["value"], lab["name"], lab["color"]) for lab in labels] == [
        (1, "spleen", list(default_color("spleen", 1))), (2, "liver", [10, 20, 30])]
    bad = json.loads(datalist.read_text(encoding="utf-8"))
    bad["labels"][1]["color"] = [300, 0, 0]
    datalist.write_text(json.dumps(bad), encoding="utf-8")
    rc = main(["finetune", "--datalist", str(datalist), "--preset", "tiny", "--steps", "1",
               "--output", str(tmp_path / "bad"), "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "color must be three integers 0-255" in err and "Traceback" not in err


def test_clear_errors(tmp_path, cases, capsys):
    rc, _ = finetune(tmp_path / "x", cases, "--steps", "1", "--labels", "livr")
    assert rc == 2 and "liver" in capsys.readouterr().err  # suggests the close match
    rc = main(["finetune", "--images", str(cases / "images"), "--label-dir", str(cases / "labels"),
               "--preset", "tiny", "--steps", "1", "--output", str(tmp_path / "y"), "--progress", "none"])
    assert rc == 2 and "label names are unknown" in capsys.readouterr().err
    rc, _ = finetune(tmp_path / "z", cases, "--steps", "1", "--freeze-encoder")
    assert rc == 2 and "--init" in capsys.readouterr().err


def test_init_from_a_pretraining_run_takes_its_size(tmp_path, cases, capsys):
    from mimcore.methods.mim import MiMPretrainModel
    from mimcore.methods.mim import MiMConfig
    from mimcore.models.convvit import preset as convvit_preset
    from mimcore.models.checkpoint import save_checkpoint

    tiny = convvit_preset("tiny")
    save_checkpoint(tmp_path / "pre", 1, MiMPretrainModel(tiny, MiMConfig()), {"preset": "tiny", "model": tiny.to_dict()})
    rc = main(["finetune", "--images", str(cases / "images"), "--label-dir", str(cases / "labels"),
               "--label-names", "1:liver,2:spleen", "--init", str(tmp_path / "pre"), "--steps", "1",
               "--output", str(tmp_path / "ft"), "--progress", "json", "--no-tensorboard", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "pre-training checkpoint" in out
    assert load_bundle(tmp_path / "ft" / "model").description["architecture"]["preset"] == "tiny"


@pytest.mark.parametrize("spacing", [("0", "1", "1"), ("-1", "1", "1")])
def test_a_spacing_that_is_not_positive_is_refused(tmp_path, cases, capsys, spacing):
    """Fine-tuning validates its preprocessing with the description pre-training and segmentation
    use (data.preprocess.Preprocessing): no run, no bundle with a zero or negative spacing."""
    rc = main(["finetune", "--images", str(cases / "images"), "--label-dir", str(cases / "labels"),
               "--label-names", "1:liver,2:spleen", "--preset", "tiny", "--spacing", *spacing, "--steps", "1",
               "--output", str(tmp_path / "run"), "--progress", "none", "--no-tensorboard", "--device", "cpu"])
    assert rc == 2
    assert "is not three positive sizes in mm" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("**/model.json"))


def test_one_preprocessing_description_round_trips():
    from mimcore.data.preprocess import Preprocessing
    from mimcore.errors import MimError

    p = Preprocessing(hu_min=-175, hu_max=250, spacing=(1.5, 1.5, 2.0))
    assert Preprocessing.from_dict(p.to_dict()) == p and Preprocessing.from_dict(p) is p
    old_bundle = {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "hu_min": -175.0, "hu_max": 250.0}
    assert Preprocessing.from_dict(old_bundle) == p  # bundles written before crop_foreground existed
    assert Preprocessing.from_dict({"hu_min": -1000, "hu_max": 1000}).spacing is None
    with pytest.raises(MimError, match="lacks hu_max"):
        Preprocessing.from_dict({"hu_min": 0})
