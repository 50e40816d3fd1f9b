"""Which labels a fine-tuning run learns, and how the label maps' values map onto them.

- names and colours: ``--label-names`` or the datalist's ``labels`` section, or (when
  starting from a segmentation bundle) the bundle's labels; a class without a colour gets
  :func:`mimcore.data.labels.default_color` of its name and model value;
- ``--labels SPEC`` keeps a subset and renumbers it (``liver,spleen`` -> 1, 2; see
  :func:`mimcore.data.labels.parse_label_selection`); without it every named label is
  learned with its own value.
"""

from __future__ import annotations

from mimcore.data.labels import Label, default_color, parse_label_selection
from mimcore.errors import MimError
from mimcore.training.finetune_data import label_table


def resolve_labels(args) -> tuple[list[Label], dict[int, int], object | None]:
    """-> (labels of the model, {value in the label maps: model value}, the init bundle or None)."""
    from mimcore.training.encoder_init import source_kind

    bundle = None
    if args.init and source_kind(args.init) == "bundle":
        from mimcore.bundles.library import get_model

        bundle = get_model(args.init)
    names, colors = label_table(args.datalist, args.label_names)
    if not names and bundle is not None:
        names = {int(lab["value"]): lab["name"] for lab in bundle.labels}
        colors = {int(lab["value"]): tuple(lab["color"]) for lab in bundle.labels if lab.get("color")}
    if not names:
        raise MimError("the label names are unknown: put a 'labels' section in the datalist "
                       "({\"1\": \"liver\", ...}) or pass --label-names 1:liver,2:spleen")
    if args.labels:
        mapping = parse_label_selection(args.labels, names)
    else:
        mapping = {v: v for v in sorted(names)}
    chosen: dict[int, Label] = {}  # model value -> the first label-map class that becomes it
    for old, new in mapping.items():
        if new not in chosen:
            name = names.get(old, f"label_{old}")
            color = colors.get(old) or default_color(name, new)
            chosen[new] = Label(new, name, color)
    labels = [chosen[v] for v in sorted(chosen)]
    if [lab.value for lab in labels] != list(range(1, len(labels) + 1)):
        raise MimError(f"the model's label values must be 1..n without gaps, got {[lab.value for lab in labels]}; "
                       "renumber with --labels (e.g. --labels liver,spleen gives 1, 2)")
    return labels, mapping, bundle
