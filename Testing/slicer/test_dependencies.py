"""MiMSlicerLib.dependencies: requirements, install plan, offline install with real pip,
and the device check in a real child process.

Only the installers that Slicer itself provides (PyTorchUtils, slicer.packaging) are
replaced, by callables that record or run real pip; our planning and argument logic runs
as it does in Slicer.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "MiMSlicer"
sys.path.insert(0, str(MODULE_DIR))

from MiMSlicerLib import dependencies as deps  # noqa: E402

REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
PYPROJECT = ROOT / "MiMCore" / "pyproject.toml"

# mimcore dependencies (and extras: openvino, mimcore[fast]) deliberately left out of the Slicer
# requirements: each must only be imported inside try/except ImportError in mimcore (checked below).
OPTIONAL_IN_SLICER = {"tensorboard", "openvino"}
# Import names that Slicer's own Python (or an extension we depend on) provides.
SLICER_PROVIDED = {"slicer", "vtk", "vtkmodules", "qt", "ctk", "SampleData", "sitkUtils", "PyTorchUtils",
                   "packaging", "mimcore", "MiMSlicerLib", "MiMSlicer"}


# ---------------------------------------------------------------------------------------
# requirements.txt


def test_requirements_file_parses_and_names_torch_and_monai():
    reqs = deps.load_requirements()
    assert deps.REQUIREMENTS_FILE == REQUIREMENTS.resolve()
    names = [canonicalize_name(r.name) for r in reqs]
    assert len(names) == len(set(names)), f"duplicate requirements: {names}"
    assert {"torch", "monai", "simpleitk", "numpy", "safetensors"} <= set(names)


def test_requirements_match_mimcore_pyproject():
    """mimcore ships inside the extension without pip, so its dependencies must all be in
    requirements.txt with the same version ranges (bar the documented optional ones)."""
    declared = {canonicalize_name(Requirement(d).name): Requirement(d)
                for d in tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]}
    ours = {canonicalize_name(r.name): r for r in deps.load_requirements()}
    missing = set(declared) - set(ours) - OPTIONAL_IN_SLICER
    assert not missing, f"in MiMCore/pyproject.toml but not in {REQUIREMENTS.name}: {sorted(missing)}"
    extra = set(ours) - set(declared)
    assert not extra, f"in {REQUIREMENTS.name} but not a mimcore dependency: {sorted(extra)}"
    for name, req in ours.items():
        assert req.specifier == declared[name].specifier, f"{name}: {req.specifier} here, {declared[name].specifier} in pyproject"


def _imports(path: Path):
    """(top-level import name, dotted name, guarded by try/except ImportError) for every
    absolute import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    guarded_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            catches = set()
            for h in node.handlers:
                types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
                catches |= {getattr(t, "id", getattr(t, "attr", None)) for t in types if t is not None}
                if h.type is None:
                    catches.add("Exception")
            if catches & {"ImportError", "ModuleNotFoundError", "Exception"}:
                for stmt in node.body:
                    guarded_nodes |= {id(n) for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], alias.name, id(node) in guarded_nodes
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.module, id(node) in guarded_nodes


def _python_files():
    files = sorted((ROOT / "MiMCore" / "mimcore").rglob("*.py")) + sorted((MODULE_DIR / "MiMSlicerLib").glob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def test_every_third_party_import_is_a_requirement():
    """What mimcore and MiMSlicerLib import must come from requirements.txt or from
    Slicer itself, or Segment fails with ModuleNotFoundError on a fresh Slicer."""
    required = {canonicalize_name(r.name) for r in deps.load_requirements()}
    import_to_dists = importlib.metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    problems = []
    for path in _python_files():
        for top, dotted, guarded in _imports(path):
            if top in stdlib or top in SLICER_PROVIDED:
                continue
            if any(opt in dotted for opt in OPTIONAL_IN_SLICER):
                if not guarded:
                    problems.append(f"{path.relative_to(ROOT)}: imports {dotted} (optional in Slicer) unguarded")
                continue
            dists = {canonicalize_name(d) for d in import_to_dists.get(top, [top])}
            if not dists & required and not guarded:
                problems.append(f"{path.relative_to(ROOT)}: imports {dotted} ({', '.join(sorted(dists))}) "
                                f"which is not in {REQUIREMENTS.name}")
    assert not problems, "\n".join(problems)


def test_load_requirements_skips_options_comments_and_reports_bad_lines(tmp_path):
    f = tmp_path / "requirements.txt"
    f.write_text("# comment\n\n--index-url https://example.invalid\nnumpy>=1.0  # inline\n"
                 "pywin32; sys_platform == 'win32'\n")
    assert [str(r) for r in deps.load_requirements(f)] == ["numpy>=1.0", 'pywin32; sys_platform == "win32"']
    f.write_text("numpy>=1.0\nthis is not a requirement\n")
    with pytest.raises(deps.DependencyError, match=r"requirements.txt:2"):
        deps.load_requirements(f)
    with pytest.raises(deps.DependencyError, match="cannot read"):
        deps.load_requirements(tmp_path / "absent.txt")


# ---------------------------------------------------------------------------------------
# find_problems on the real environment


def test_this_environment_satisfies_the_requirements():
    # the test environment runs mimcore, so it must satisfy what the module asks for
    assert deps.find_problems(deps.load_requirements()) == []


def test_missing_mismatched_and_platform_specific_requirements():
    numpy_version = importlib.metadata.version("numpy")
    reqs = [Requirement("numpy>=999"), Requirement("mim-surely-absent-package>=1"),
            Requirement(f"numpy=={numpy_version}"), Requirement("mim-surely-absent-package; sys_platform == 'nonesuch'")]
    problems = deps.find_problems(reqs)
    assert [(p.name, p.installed) for p in problems] == [("numpy", numpy_version), ("mim-surely-absent-package", None)]
    assert problems[0].describe() == f"numpy>=999: version {numpy_version} is installed"
    assert problems[1].describe() == "mim-surely-absent-package>=1: not installed"


def test_local_version_of_torch_satisfies_a_plain_range():
    torch_version = importlib.metadata.version("torch")  # e.g. 2.13.0+cpu
    assert deps.find_problems([Requirement("torch>=2.2")]) == []
    assert deps.find_problems([Requirement(f"torch=={torch_version.split('+')[0]}")]) == []


# ---------------------------------------------------------------------------------------
# the install plan


def _problems(*specs, installed=None):
    return [deps.Problem(Requirement(s), installed) for s in specs]


def test_plan_puts_torch_through_pytorchutils_and_the_rest_through_pip_ensure():
    steps = deps.plan_install(_problems("monai>=1.4", "torch>=2.2", "scipy>=1.10"),
                              have_pytorchutils=True, have_pip_ensure=True)
    assert [(s.via, s.requirements) for s in steps] == [
        (deps.VIA_PYTORCHUTILS, ["torch>=2.2"]), (deps.VIA_PIP_ENSURE, ["monai>=1.4", "scipy>=1.10"])]
    assert steps[0].torch_version == ">=2.2"


def test_plan_without_pytorch_extension_or_pip_ensure_uses_pip_install_and_warns():
    steps = deps.plan_install(_problems("torch>=2.2", "monai>=1.4"), have_pytorchutils=False, have_pip_ensure=False)
    assert [(s.via, s.pip_args) for s in steps] == [
        (deps.VIA_PIP_INSTALL, ["torch>=2.2"]), (deps.VIA_PIP_INSTALL, ["monai>=1.4"])]
    assert "PyTorch extension" in steps[0].note
    text = deps.describe_plan(_problems("torch>=2.2", "monai>=1.4"), steps)
    assert "torch>=2.2: not installed" in text and "pip install monai>=1.4" in text


def test_plan_with_nothing_to_do_is_empty():
    assert deps.plan_install([], have_pytorchutils=True, have_pip_ensure=True) == []


def test_offline_plan_uses_only_the_wheel_folder(tmp_path):
    with pytest.raises(deps.DependencyError, match="does not exist"):
        deps.plan_install(_problems("monai>=1.4"), wheelhouse=tmp_path / "nope")
    with pytest.raises(deps.DependencyError, match="no .whl files"):
        deps.plan_install(_problems("monai>=1.4"), wheelhouse=tmp_path)
    _make_wheel(tmp_path, "mimtestpkg", "1.0")
    steps = deps.plan_install(_problems("torch>=2.2", "monai>=1.4"), wheelhouse=tmp_path, have_pytorchutils=True,
                              have_pip_ensure=True)
    offline = ["--no-index", "--find-links", str(tmp_path.resolve())]
    assert [(s.via, s.pip_args) for s in steps] == [
        (deps.VIA_PIP_INSTALL, offline + ["torch>=2.2"]), (deps.VIA_PIP_INSTALL, offline + ["monai>=1.4"])]


# ---------------------------------------------------------------------------------------
# running a plan: real pip, offline


def _make_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal valid pure-Python wheel, written by hand (no build backend, no network)."""
    files = {f"{name}/__init__.py": f"__version__ = {version!r}\n".encode(),
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: mim-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def _real_pip_into(target: Path):
    """pip_install as Slicer's would run it, but into ``target`` instead of Slicer's Python."""

    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}  # no find-links/index from this machine's pip.conf

    def pip_install(args):
        subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir",
                        "--target", str(target), *args], check=True, capture_output=True, text=True, timeout=300,
                       env=env)

    return pip_install


def test_offline_install_with_real_pip_then_no_problems_left(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _make_wheel(wheels, "mimtestpkg", "1.0")
    reqs = [Requirement("mimtestpkg>=1.0")]
    problems = deps.find_problems(reqs, search_path=[str(target)])
    assert [(p.name, p.installed) for p in problems] == [("mimtestpkg", None)]

    steps = deps.plan_install(problems, wheelhouse=wheels, have_pip_ensure=True)
    logged = []
    deps.run_plan(steps, deps.Installers(pip_install=_real_pip_into(target)), log=logged.append)
    assert (target / "mimtestpkg" / "__init__.py").is_file()
    assert deps.find_problems(reqs, search_path=[str(target)]) == []
    assert deps.installed_version("mimtestpkg", [str(target)]) == "1.0"
    assert len(logged) == 1 and "--no-index" in logged[0]


def test_offline_install_of_a_version_the_folder_lacks_fails_readably(tmp_path):
    _make_wheel(tmp_path, "mimtestpkg", "1.0")
    steps = deps.plan_install(_problems("mimtestpkg>=2"), wheelhouse=tmp_path)
    with pytest.raises(deps.DependencyError) as err:
        deps.run_plan(steps, deps.Installers(pip_install=_real_pip_into(tmp_path / "site")), log=lambda s: None)
    text = str(err.value)
    assert "mimtestpkg>=2" in text and "exit code" in text
    assert "No matching distribution" in text or "Could not find a version" in text


def test_run_plan_calls_pytorchutils_and_pip_ensure_with_the_planned_arguments():
    calls = []
    installers = deps.Installers(pip_install=lambda a: calls.append(("pip_install", a)),
                                 pip_ensure=lambda r: calls.append(("pip_ensure", r)),
                                 install_torch=lambda v: calls.append(("torch", v)) or "torch-module")
    steps = deps.plan_install(_problems("torch>=2.2", "monai>=1.4"), have_pytorchutils=True, have_pip_ensure=True)
    deps.run_plan(steps, installers, log=lambda s: None)
    assert calls == [("torch", ">=2.2"), ("pip_ensure", ["monai>=1.4"])]


def test_run_plan_reports_a_torch_install_that_returned_nothing():
    steps = deps.plan_install(_problems("torch>=2.2"), have_pytorchutils=True)
    installers = deps.Installers(pip_install=lambda a: None, install_torch=lambda v: None)
    with pytest.raises(deps.DependencyError, match="PyTorch was not installed"):
        deps.run_plan(steps, installers, log=lambda s: None)
    with pytest.raises(deps.DependencyError, match="PyTorch extension but it is not available"):
        deps.run_plan(steps, deps.Installers(pip_install=lambda a: None), log=lambda s: None)


def test_installer_detection_outside_slicer_application():
    # slicer-core has neither the PyTorch extension nor slicer.packaging
    assert deps.has_pytorchutils() is False
    assert deps.has_pip_ensure() is False


def test_slicer_installers_fall_back_to_slicer_util_pip_install(tmp_path):
    """Without slicer.packaging, the plan's pip arguments go to slicer.util.pip_install, which
    runs PythonSlicer -m pip; outside the application there is no PythonSlicer, and the
    step fails with that reason rather than silently."""
    installers = deps.slicer_installers()
    assert installers.pip_ensure is None and installers.install_torch is None
    _make_wheel(tmp_path, "mimtestpkg", "1.0")
    steps = deps.plan_install(_problems("mimtestpkg>=1"), wheelhouse=tmp_path)
    with pytest.raises(deps.DependencyError, match="mimtestpkg>=1 failed: .*PythonSlicer"):
        deps.run_plan(steps, installers, log=lambda s: None)


# ---------------------------------------------------------------------------------------
# device check: a real child process


def test_device_check_on_cpu_runs_the_computation():
    import torch

    check = deps.check_device("cpu")
    assert check.ok, check.message
    assert (check.device, check.torch_version, check.stage) == ("cpu", torch.__version__, "done")
    assert "ran a test computation on cpu" in check.message


def test_device_check_auto_picks_what_torch_sees():
    import torch

    check = deps.check_device("auto")
    assert check.ok, check.message
    assert check.device == ("cuda" if torch.cuda.is_available() else
                            "mps" if torch.backends.mps.is_available() else "cpu")


def test_device_check_cuda_reports_clearly_when_it_cannot_run():
    import torch

    check = deps.check_device("cuda")
    if torch.cuda.is_available():
        assert check.ok and check.gpu, check.message
        return
    assert not check.ok and check.stage == "resolve"
    assert "cannot be used" in check.message and "'cpu'" in check.message
    if torch.version.cuda is None:
        assert "CPU-only build" in check.message and "PyTorch extension" in check.message


def test_device_check_without_torch_says_it_cannot_be_imported():
    # -S -I: no site-packages, so this interpreter has no torch
    check = deps.check_device("cpu", python=[sys.executable, "-S", "-I"])
    assert not check.ok and check.stage == "import"
    assert "PyTorch cannot be imported" in check.message and "ModuleNotFoundError" in check.message


def test_device_check_process_failures_are_reported_not_raised(tmp_path):
    check = deps.check_device("cpu", python=str(tmp_path / "no-such-python"))
    assert not check.ok and check.stage == "process" and "cannot start" in check.message
    # the first -c wins: this interpreter sleeps instead of running the check
    check = deps.check_device("cpu", python=[sys.executable, "-c", "import time; time.sleep(30)"], timeout=2)
    assert not check.ok and "did not finish in 2 s" in check.message
    check = deps.check_device("cpu", python=[sys.executable, "-c", "import sys; sys.exit('boom')"])
    assert not check.ok and "exited with code 1" in check.message and "boom" in check.message
    with pytest.raises(ValueError, match="unknown device"):
        deps.check_device("tpu")
