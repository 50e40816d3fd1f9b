"""The study's data: the pre-training, fine-tuning and test datalists it writes, from the
sample CTs or from the user's datalists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mimcore.data.volume_io import volume_stem
from study.commands import shell
from study.runner import write_json
from study.settings import SAME_PATIENT, StudyError


def case_id(path: str) -> str:
    """The case name of a volume path: its name without the volume suffix."""
    return volume_stem(path)


def read_section(datalist: Path, section: str, need_label: bool) -> list[dict]:
    """Entries of a MONAI-style datalist section, paths absolute (relative to the datalist)."""
    try:
        data = json.loads(datalist.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise StudyError(f"cannot read the datalist {datalist}: {e}") from None
    if section not in data or not isinstance(data[section], list):
        raise StudyError(f"the datalist {datalist} has no '{section}' section")
    out = []
    for item in data[section]:
        entry = dict(item) if isinstance(item, dict) else {"image": item}
        for key in ("image", "label"):
            if isinstance(entry.get(key), str):
                entry[key] = str((datalist.parent / entry[key]).resolve())
        if need_label and not entry.get("label"):
            raise StudyError(f"'{section}' of {datalist} has a case without a label: {entry.get('image')}")
        out.append(entry)
    return out


def label_names(datalist: Path) -> dict[str, str]:
    data = json.loads(datalist.read_text(encoding="utf-8"))
    return {str(k): str(v) for k, v in (data.get("labels") or {}).items()}


def sample_datalist(cfg: dict, dry_run: bool) -> Path:
    if cfg["data"].get("sample_datalist"):
        return Path(cfg["data"]["sample_datalist"])
    cmd = [sys.executable, "-m", "mimcore", "data", "samples", "--quiet"]
    print("$ " + shell(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise StudyError("`mim data samples` failed; fetch the sample data first (see `mim data samples --help`)")
    return Path(proc.stdout.strip().splitlines()[-1])


def prepare_data(cfg: dict, out: Path, dry_run: bool) -> dict:
    """The study's datalists (written to out/data unless dry_run) and its test cases."""
    data = cfg["data"]
    if data.get("source") == "samples":
        samples = sample_datalist(cfg, dry_run)
        names = label_names(samples)
        labelled = read_section(samples, "training", need_label=True)
        series = [e for e in labelled if "dicom" in Path(e["image"]).name]
        others = [e for e in labelled if e not in series]
        if len(series) != 1 or not others:
            raise StudyError(f"{samples} is not the sample datalist of `mim data samples` (it needs the CT series "
                             "and one more labelled CT in 'training')")
        train, test = series, others[:1]
        if data.get("swap_cases"):
            train, test = test, train
        excluded = {Path(e["image"]) for e in test}  # never pre-train on the evaluated patient
        excluded |= {Path(e["image"]).parent / n for e in test for n in SAME_PATIENT.get(Path(e["image"]).name, ())}
        unlabelled = read_section(samples, "pretraining", False)
        held_out = read_section(samples, "held_out", False) if "held_out" in json.loads(samples.read_text()) else []
        pretrain = [e for e in unlabelled + held_out if Path(e["image"]) not in excluded]
        pretrain_list = {"pretraining": [{"image": e["image"]} for e in pretrain]}
        pretrain_path, pretrain_section = out / "data" / "pretrain.json", "pretraining"
        source = str(samples)
    else:
        if not data.get("pretrain_datalist") or not data.get("finetune_datalist"):
            raise StudyError("the paper scale needs --pretrain-datalist (unlabelled CTs) and --finetune-datalist "
                             "(labelled cases; BTCV-style 'training'/'validation' sections)")
        ft_source = Path(data["finetune_datalist"])
        names = label_names(ft_source)
        train = read_section(ft_source, data.get("train_section", "training"), True)
        test = read_section(ft_source, data.get("test_section", "validation"), True)
        pretrain_path, pretrain_section = Path(data["pretrain_datalist"]), data.get("pretrain_section")
        pretrain_list = None
        pretrain = read_section(pretrain_path, pretrain_section, False) if pretrain_section else []
        source = f"{data['pretrain_datalist']} + {data['finetune_datalist']}"
    if data.get("val_on", "test") == "train":
        val = []  # `mim finetune` then validates on the training cases
    elif data.get("source") == "samples" or data.get("val_section") in (None, data.get("test_section")):
        val = test
    else:  # a labelled validation section of its own
        val = read_section(Path(data["finetune_datalist"]), data["val_section"], True)
    keep = ("image", "label")
    finetune_list = {"labels": names, "training": [{k: e[k] for k in keep} for e in train],
                     "validation": [{k: e[k] for k in keep} for e in val]}
    cases, seen = [], set()
    for i, e in enumerate(test):
        cid = case_id(e["image"])
        cid = cid if cid not in seen else f"{cid}_{i}"
        seen.add(cid)
        cases.append({"case": cid, "image": e["image"], "label": e["label"]})
    paths = {"pretrain": pretrain_path, "finetune": out / "data" / "finetune.json", "test": out / "data" / "test.json"}
    if dry_run:
        print(f"[dry-run] data: pre-training on {len(pretrain)} volume(s) "
              f"({', '.join(Path(e['image']).name for e in pretrain[:6])}{', ...' if len(pretrain) > 6 else ''}); "
              f"fine-tuning on {', '.join(case_id(e['image']) for e in train[:6])}; validation on "
              f"{', '.join(case_id(e['image']) for e in val[:6]) or 'the training case(s)'}; test on "
              f"{', '.join(c['case'] for c in cases[:6])}", flush=True)
        if pretrain_list is not None:
            print(f"[dry-run] would write {paths['pretrain']}", flush=True)
        print(f"[dry-run] would write {paths['finetune']} and {paths['test']}", flush=True)
    else:
        (out / "data").mkdir(parents=True, exist_ok=True)
        if pretrain_list is not None:
            write_json(paths["pretrain"], pretrain_list)
        write_json(paths["finetune"], finetune_list)
        write_json(paths["test"], {"test": cases})
    return {"paths": paths, "pretrain_section": pretrain_section, "names": names, "train": train, "test": cases,
            "validation": val, "pretrain_volumes": [e["image"] for e in pretrain], "source": source,
            "pretrain_list": pretrain_list, "finetune_list": finetune_list}
