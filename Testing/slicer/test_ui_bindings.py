"""The .ui file and MiMSlicer.py agree: widget names, SlicerParameterName bindings, and
widget/type pairs that Slicer's parameterNodeWrapper can connect.

MiMSlicer.py imports qt, which does not exist outside the Slicer application, so it is
read with ``ast`` here, not imported. The connector rules below follow the
``canRepresent`` methods of slicer/parameterNodeWrapper/guiConnectors.py: a pair it
cannot connect raises "Unable to create GUI connector" when the module opens in Slicer.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = "MiMSlicer"
MODULE_FILE = ROOT / MODULE / f"{MODULE}.py"
UI_FILE = ROOT / MODULE / "Resources" / "UI" / f"{MODULE}.ui"

# widget class -> parameter types it can be bound to (parameterNodeWrapper guiConnectors)
CONNECTABLE = {
    "QCheckBox": {"bool"}, "ctkCheckBox": {"bool"}, "QPushButton": {"bool"}, "ctkCheckablePushButton": {"bool"},
    "QSpinBox": {"int"}, "QSlider": {"int"},
    "QDoubleSpinBox": {"float", "int"}, "ctkSliderWidget": {"float", "int"}, "qMRMLSliderWidget": {"float", "int"},
    "ctkDoubleSlider": {"float", "int"}, "ctkDoubleSpinBox": {"float", "int"}, "qMRMLSpinBox": {"float", "int"},
    "QComboBox": {"int", "float", "str", "bool"}, "ctkComboBox": {"int", "float", "str", "bool"},
    "QLineEdit": {"str"}, "QLabel": {"str"}, "QTextEdit": {"str"},
    "ctkPathLineEdit": {"Path"}, "ctkDirectoryButton": {"Path"},
    "qMRMLNodeComboBox": {"node"},
}


# ---------------------------------------------------------------------------------------
# reading both sides


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    widgets = {}
    for w in root.iter("widget"):
        name = w.get("name")
        assert name not in widgets, f"widget name {name} used twice in the .ui"
        widgets[name] = w
    return widgets


def widget_property(widget: ET.Element, name: str):
    for p in widget.findall("property"):
        if p.get("name") == name:
            value = p[0]
            if value.tag == "stringlist":
                return [s.text for s in value.findall("string")]
            return value.text
    return None


def bound_widgets() -> dict[str, ET.Element]:
    """SlicerParameterName -> widget."""
    bound = {}
    for name, w in ui_widgets().items():
        param = widget_property(w, "SlicerParameterName")
        if param is not None:
            assert param not in bound, f"parameter {param} bound to two widgets ({bound[param].get('name')}, {name})"
            bound[param] = w
    return bound


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def parameter_class() -> ast.ClassDef:
    classes = [c for c in module_tree().body if isinstance(c, ast.ClassDef)
               and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in c.decorator_list)]
    assert len(classes) == 1, "one @parameterNodeWrapper class"
    return classes[0]


def parameters() -> dict[str, ast.expr]:
    """name -> annotation of each parameter of the parameterNodeWrapper class."""
    return {s.target.id: s.annotation for s in parameter_class().body if isinstance(s, ast.AnnAssign)}


def base_type(annotation: ast.expr) -> tuple[str, list[ast.expr]]:
    """('int', [validators]) for Annotated[int, ...]; ('node', []) for a vtkMRML class."""
    validators = []
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", None) == "Annotated":
        elts = annotation.slice.elts
        annotation, validators = elts[0], list(elts[1:])
    if isinstance(annotation, ast.Subscript):  # list[...], etc.
        return f"{annotation.value.id}[]", validators
    name = annotation.id if isinstance(annotation, ast.Name) else ast.unparse(annotation)
    if name.startswith("vtkMRML"):
        return "node", validators
    return name, validators


def node_class(annotation: ast.expr) -> str:
    return annotation.id


def widget_managed() -> set[str]:
    for node in module_tree().body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WIDGET_MANAGED_PARAMETERS"
                                                for t in node.targets):
            return set(ast.literal_eval(node.value))
    pytest.fail("MiMSlicer.py defines no WIDGET_MANAGED_PARAMETERS")


def used_ui_names() -> dict[str, int]:
    """Every ``self.ui.<name>`` in MiMSlicer.py, with its first line."""
    used = {}
    for node in ast.walk(module_tree()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            used.setdefault(node.attr, node.lineno)
    return used


# ---------------------------------------------------------------------------------------
# the checks


def test_every_widget_the_module_uses_exists_in_the_ui():
    used = used_ui_names()
    assert len(used) > 20, "the widget reads its widgets through self.ui"
    missing = {name: line for name, line in used.items() if name not in ui_widgets()}
    assert not missing, f"MiMSlicer.py uses widgets the .ui does not define (name: line): {missing}"


def test_every_bound_widget_has_a_parameter():
    params = parameters()
    unknown = {p: w.get("name") for p, w in bound_widgets().items() if p not in params}
    assert not unknown, f"SlicerParameterName values with no parameter in {parameter_class().name}: {unknown}"


def test_every_parameter_has_a_widget_or_is_managed_by_the_widget_code():
    params, bound, managed = parameters(), bound_widgets(), widget_managed()
    assert managed <= set(params), f"WIDGET_MANAGED_PARAMETERS names unknown parameters: {managed - set(params)}"
    both = managed & set(bound)
    assert not both, f"parameters both bound in the .ui and managed by code: {both}"
    orphans = set(params) - set(bound) - managed
    assert not orphans, f"parameters with no widget: {orphans}"
    # a widget-managed parameter is really written by the widget code
    source = MODULE_FILE.read_text(encoding="utf-8")
    for name in managed:
        assert re.search(rf"\.{name}\s*=", source), f"{name} is declared widget-managed but never set"


@pytest.mark.parametrize("param", sorted(bound_widgets()))
def test_bound_widget_and_parameter_type_can_be_connected(param):
    widget = bound_widgets()[param]
    cls = widget.get("class")
    annotation = parameters()[param]
    kind, validators = base_type(annotation)
    assert cls in CONNECTABLE, f"{widget.get('name')}: parameterNodeWrapper has no connector for {cls}"
    assert kind in CONNECTABLE[cls], f"{widget.get('name')} ({cls}) cannot be bound to a {kind} parameter"
    validator_names = [getattr(v.func, "id", None) for v in validators if isinstance(v, ast.Call)]
    if cls in ("QComboBox", "ctkComboBox"):
        assert "Choice" in validator_names, f"{param}: a combo box needs Annotated[..., Choice([...])]"
    if cls == "QSlider":
        assert "WithinRange" in validator_names, f"{param}: an unbounded QSlider is refused"
    if kind == "node":
        types = widget_property(widget, "nodeTypes") or []
        annotated = node_class(annotation.slice.elts[0] if isinstance(annotation, ast.Subscript) else annotation)
        assert annotated in types, f"{widget.get('name')} offers {types}, the parameter holds {annotated}"
    if cls in ("QSpinBox",) and "WithinRange" in validator_names:
        rng = next(v for v in validators if getattr(v.func, "id", None) == "WithinRange")
        lo, hi = (ast.literal_eval(a) for a in rng.args)
        w_lo, w_hi = int(widget_property(widget, "minimum") or 0), int(widget_property(widget, "maximum") or 99)
        assert (w_lo, w_hi) == (lo, hi), f"{widget.get('name')}: .ui range {w_lo}..{w_hi}, parameter {lo}..{hi}"


def test_every_node_selector_gets_the_scene():
    """A qMRMLNodeComboBox without the mrmlSceneChanged -> setMRMLScene connection stays empty."""
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget").get("name")
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == top and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    selectors = {n for n, w in ui_widgets().items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors and selectors == connected, f"not connected: {selectors - connected}"


def test_custom_widgets_are_declared():
    root = ET.parse(UI_FILE).getroot()
    declared = {cw.findtext("class") for cw in root.iter("customwidget")}
    used = {w.get("class") for w in ui_widgets().values()}
    custom = {c for c in used if c.startswith(("qMRML", "ctk", "qSlicer"))}
    assert custom <= declared, f"custom widget classes used but not declared: {custom - declared}"


def test_the_three_sections_and_their_controls():
    widgets = ui_widgets()
    sections = [n for n, w in widgets.items() if w.get("class") == "ctkCollapsibleButton"]
    titles = [widget_property(widgets[n], "text") for n in sections]
    for title in ("Segment", "Mask-in-mask preview", "Fine-tune"):
        assert title in titles
    for name in ("segmentButton", "segmentProgressBar", "segmentStatusLabel", "logTextEdit", "modelComboBox",
                 "addModelFromFileButton", "addModelFromRegistryButton", "previewButton", "previewLevelSpinBox",
                 "finetuneButton", "finetuneCasesTable", "finetuneProgressBar"):
        assert name in widgets, name


def test_strings_in_the_module_are_translatable():
    """Module title, help and acknowledgement go through _(), categories through
    translate("qSlicerAbstractCoreModule", ...), as the template does."""
    tree = module_tree()
    module_class = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == MODULE)
    assigned = {}
    for node in ast.walk(module_class):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            assigned[node.targets[0].attr] = node.value
    for attr in ("title", "helpText", "acknowledgementText"):
        value = assigned.get(attr)
        assert isinstance(value, ast.Call) and getattr(value.func, "id", None) == "_", f"{attr} is not wrapped in _()"
    categories = assigned.get("categories")
    assert isinstance(categories, ast.List) and all(
        isinstance(c, ast.Call) and getattr(c.func, "id", None) == "translate" for c in categories.elts)
    # user-visible strings of the widget go through _() too: no bare literal given to a display call
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in (
                "errorDisplay", "warningDisplay", "confirmOkCancelDisplay", "tryWithErrorDisplay"):
            if node.args and isinstance(node.args[0], ast.Constant):
                pytest.fail(f"line {node.lineno}: untranslated message {node.args[0].value!r}")


def test_widget_does_no_computation():
    """The widget class never imports torch, numpy or mimcore: it calls the logic."""
    tree = module_tree()
    widget = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == f"{MODULE}Widget")
    for node in ast.walk(widget):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.split(".")[0] in ("torch", "numpy", "mimcore", "monai", "SimpleITK") for n in names), \
                f"line {node.lineno}: the widget imports {names}"
