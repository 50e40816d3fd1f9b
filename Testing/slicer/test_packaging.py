"""Packaging of the 3D Slicer extension: CMake lists, bundled mimcore, icons, the
Extensions Index entry and their agreement.

Two levels:
* static checks that read the files (always run);
* a real CMake configure of the top-level CMakeLists.txt against a stand-in for Slicer's
  CMake API (SlicerConfig.cmake defining ``slicerMacroBuildScriptedModule`` etc., written
  below), which records what would be installed where, following
  ctkMacroCompilePythonScript's rules (a relative SCRIPT/RESOURCE keeps its path below the
  module folder; an absolute SCRIPT keeps its path relative to CMAKE_CURRENT_BINARY_DIR).
  The installed tree is then rebuilt in a temporary folder and imported in a child
  Python: every MiMSlicerLib and mimcore module must import from it alone.
  Skipped (with the reason) where cmake or a C compiler is missing.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = "MiMSlicer"
MODULE_DIR = ROOT / MODULE
LIB_DIR = MODULE_DIR / "MiMSlicerLib"
MIMCORE_DIR = ROOT / "MiMCore" / "mimcore"
INDEX_ENTRY = ROOT / "Resources" / f"{MODULE}.json"

# The Extensions Index's current entry schema (Slicer/ExtensionsIndex,
# schemas/slicer-extension-catalog-entry-schema-v1.0.2.json), as rules.
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#"
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}
SCHEMA_TYPES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str,
                "enabled": bool, "tier": int}
SCHEMA_SCM_TYPES = {"git", "local"}


# ---------------------------------------------------------------------------------------
# helpers


def _strip_cmake_comment(line: str) -> str:
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            return line[:i]
    return line


def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command name lower-cased, arguments) of a CMake file: comments dropped, quoted
    arguments unquoted. Enough for the plain files here (no nested parentheses in args)."""
    text = "\n".join(_strip_cmake_comment(line) for line in path.read_text(encoding="utf-8").splitlines())
    commands = []
    for match in re.finditer(r"(\w+)\s*\(((?:[^()\"]|\"[^\"]*\")*)\)", text):
        args = [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"|[^\s"]+', match.group(2))]
        commands.append((match.group(1).lower(), args))
    return commands


def cmake_sets(path: Path) -> dict[str, list[str]]:
    return {args[0]: args[1:] for name, args in cmake_commands(path) if name == "set" and args}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def raw_url_path(url: str, owner_repo: str, revision: str) -> Path:
    """The repository file a raw.githubusercontent.com URL points to."""
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "https" and parts.netloc == "raw.githubusercontent.com", url
    owner, repo, branch, *rest = parts.path.strip("/").split("/")
    assert f"{owner}/{repo}" == owner_repo, f"{url} is not in {owner_repo}"
    assert branch == revision, f"{url} is on branch {branch}, the index entry builds {revision}"
    return ROOT.joinpath(*rest)


def module_python_files() -> list[str]:
    return sorted(f"MiMSlicerLib/{p.name}" for p in LIB_DIR.glob("*.py"))


def mimcore_files() -> list[str]:
    return sorted(p.relative_to(MIMCORE_DIR).as_posix() for p in MIMCORE_DIR.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def top_sets():
    return cmake_sets(ROOT / "CMakeLists.txt")


@pytest.fixture(scope="module")
def module_sets():
    return cmake_sets(MODULE_DIR / "CMakeLists.txt")


@pytest.fixture(scope="module")
def entry():
    return json.loads(INDEX_ENTRY.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------
# top level: metadata, and agreement with the index entry


def test_top_level_cmake_follows_the_extension_template():
    commands = cmake_commands(ROOT / "CMakeLists.txt")
    names = [c for c, _ in commands]
    project = [args for c, args in commands if c == "project"]
    assert project == [[MODULE]], "project() names the extension, as the index expects (file name = project)"
    order = ["cmake_minimum_required", "project", "find_package", "include", "add_subdirectory", "include", "include"]
    assert [n for n in names if n in set(order)] == order
    includes = [args[0] for c, args in commands if c == "include"]
    assert includes == ["${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"]
    assert ("find_package", ["Slicer", "REQUIRED"]) in commands
    assert ("add_subdirectory", [MODULE]) in commands


def test_extension_metadata_is_complete(top_sets):
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert top_sets.get(key) and all(v.strip() for v in top_sets[key]), f"{key} is not set"
    assert top_sets["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert top_sets["EXTENSION_DEPENDS"] == ["PyTorch"], "SlicerPyTorch's extension name is PyTorch"
    assert len(top_sets["EXTENSION_DESCRIPTION"][0]) >= 80


def test_index_entry_is_valid_against_the_schema(entry):
    text = INDEX_ENTRY.read_bytes()
    assert b"\r" not in text, "the index requires LF line endings"
    assert entry["$schema"] == SCHEMA_URL
    missing = SCHEMA_REQUIRED - set(entry)
    assert not missing, f"required keys missing: {missing}"
    extra = set(entry) - set(SCHEMA_TYPES)
    assert not extra, f"keys the schema does not allow (additionalProperties: false): {extra}"
    for key, value in entry.items():
        assert type(value) is SCHEMA_TYPES[key], f"{key} must be {SCHEMA_TYPES[key].__name__}"
    assert all(isinstance(d, str) for d in entry.get("build_dependencies", []))
    assert 1 <= entry.get("tier", 1) <= 5
    assert entry.get("scm_type", "git") in SCHEMA_SCM_TYPES


def test_index_entry_agrees_with_cmake(entry, top_sets):
    homepage = top_sets["EXTENSION_HOMEPAGE"][0]
    assert entry["category"] == top_sets["EXTENSION_CATEGORY"][0]
    assert entry["build_dependencies"] == top_sets["EXTENSION_DEPENDS"]
    scm = entry["scm_url"].removesuffix(".git")
    assert scm == homepage, "the index builds the repository the homepage names"
    assert entry.get("build_subdirectory", ".") == ".", "not a superbuild: CMakeLists.txt is at the top"
    # the index's own naming rules: repository Slicer*, extension (file) name not Slicer*
    repo = urllib.parse.urlsplit(scm).path.rstrip("/").split("/")[-1]
    assert repo.startswith("Slicer") and not INDEX_ENTRY.stem.startswith("Slicer")
    assert INDEX_ENTRY.stem == MODULE


def test_icon_and_screenshot_urls_point_to_files_here(entry, top_sets):
    owner_repo = urllib.parse.urlsplit(top_sets["EXTENSION_HOMEPAGE"][0]).path.strip("/")
    revision = entry.get("scm_revision", "main")
    icon = raw_url_path(top_sets["EXTENSION_ICONURL"][0], owner_repo, revision)
    assert icon.is_file(), f"EXTENSION_ICONURL points to {icon.relative_to(ROOT)}, which does not exist"
    assert png_size(icon) == (128, 128)
    shots = top_sets["EXTENSION_SCREENSHOTURLS"][0].split()
    assert shots, "at least one screenshot"
    for url in shots:
        shot = raw_url_path(url, owner_repo, revision)
        assert shot.is_file(), f"EXTENSION_SCREENSHOTURLS points to {shot.relative_to(ROOT)}, which does not exist"
        w, h = png_size(shot)
        assert w >= 640 and h >= 480, "a screenshot, not a thumbnail"


def test_same_homepage_everywhere(top_sets):
    homepage = top_sets["EXTENSION_HOMEPAGE"][0]
    urls = set(re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", (MODULE_DIR / f"{MODULE}.py").read_text(encoding="utf-8")))
    urls.discard("https://github.com/Slicer/Slicer")  # the template's links to ScriptedLoadableModule.py
    assert urls == {homepage}, f"{MODULE}.py links {urls}, CMake says {homepage}"
    assert homepage in (ROOT / "README.md").read_text(encoding="utf-8")


def test_icons_are_128_pixel_pngs_with_content():
    from PIL import Image

    for path in (ROOT / "Resources" / f"{MODULE}.png", MODULE_DIR / "Resources" / "Icons" / f"{MODULE}.png"):
        assert png_size(path) == (128, 128), path
        with Image.open(path) as img:
            colours = img.convert("RGBA").getcolors(maxcolors=128 * 128)
        assert len(colours) > 20, f"{path} looks blank"


# ---------------------------------------------------------------------------------------
# module CMake: every file the module needs at run time


def test_every_module_python_file_is_listed(module_sets):
    scripts = [s.replace("${MODULE_NAME}", MODULE) for s in module_sets["MODULE_PYTHON_SCRIPTS"]]
    assert scripts[0] == f"{MODULE}.py"
    assert len(scripts) == len(set(scripts)), "listed twice"
    assert sorted(scripts[1:]) == module_python_files(), (
        "MODULE_PYTHON_SCRIPTS must list exactly MiMSlicerLib/*.py: "
        f"missing {sorted(set(module_python_files()) - set(scripts))}, "
        f"stale {sorted(set(scripts[1:]) - set(module_python_files()))}")


def test_every_resource_is_listed_and_exists(module_sets):
    resources = [r.replace("${MODULE_NAME}", MODULE) for r in module_sets["MODULE_PYTHON_RESOURCES"]]
    on_disk = sorted(p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*")
                     if p.is_file())
    assert sorted(resources) == on_disk


def _referenced_resources(path: Path) -> set[str]:
    """Resource paths a Python file loads: resourcePath("X") calls (-> Resources/X) and
    path expressions that go through a "Resources" component."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()

    def parts_of(node):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return parts_of(node.left) + parts_of(node.right)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "join", "joinpath", "Path"):
            return [p for a in node.args for p in parts_of(a)]
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        return [None]

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "resourcePath" and node.args:
            arg = node.args[0]
            assert isinstance(arg, ast.Constant), f"{path.name}: resourcePath() with a computed name"
            found.add(f"Resources/{arg.value}")
        parts = parts_of(node) if isinstance(node, (ast.BinOp, ast.Call)) else []
        if "Resources" in parts:
            tail = parts[parts.index("Resources"):]
            if all(isinstance(p, str) for p in tail) and len(tail) > 1:
                found.add("/".join(tail))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("Resources/"):
            found.add(node.value)
    return found


def test_every_resource_the_code_loads_is_listed(module_sets):
    resources = {r.replace("${MODULE_NAME}", MODULE) for r in module_sets["MODULE_PYTHON_RESOURCES"]}
    referenced = {}
    for path in [MODULE_DIR / f"{MODULE}.py", *sorted(LIB_DIR.glob("*.py"))]:
        for res in _referenced_resources(path):
            referenced.setdefault(res, path.name)
    assert "Resources/UI/MiMSlicer.ui" in referenced and "Resources/requirements.txt" in referenced
    missing = {r: f for r, f in referenced.items() if r not in resources}
    assert not missing, f"loaded by the code but not in MODULE_PYTHON_RESOURCES: {missing}"


def test_every_module_import_resolves_to_a_shipped_file(module_sets):
    """What MiMSlicer.py and MiMSlicerLib import from MiMSlicerLib or mimcore must exist."""
    shipped_lib = {Path(p).stem for p in module_python_files()}
    problems = []
    for path in [MODULE_DIR / f"{MODULE}.py", *sorted(LIB_DIR.glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import inside MiMSlicerLib
                    base = "MiMSlicerLib" + (f".{base}" if base else "")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "MiMSlicerLib" and len(parts) > 1 and parts[1] not in shipped_lib:
                    if not (LIB_DIR / "__init__.py").is_file() or parts[1] not in _defined_names(LIB_DIR / "__init__.py"):
                        problems.append(f"{path.name}: {name}")
                if parts[0] == "mimcore" and len(parts) > 1:
                    target = MIMCORE_DIR.joinpath(*parts[1:])
                    if not (target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()
                            or _name_in_package(MIMCORE_DIR.joinpath(*parts[1:-1]), parts[-1])):
                        problems.append(f"{path.name}: {name}")
    assert not problems, f"imports that the packaged module cannot resolve: {problems}"


def _defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)} | {
        n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def _name_in_package(folder: Path, name: str) -> bool:
    init = folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")
    return init.is_file() and name in (_defined_names(init) | _imported_names(init))


def _imported_names(path: Path) -> set[str]:
    return {a.asname or a.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(n, ast.ImportFrom) for a in n.names}


def test_mimcore_is_bundled_by_a_glob_of_its_python_files():
    commands = cmake_commands(MODULE_DIR / "CMakeLists.txt")
    globs = [args for c, args in commands if c == "file" and args and args[0] == "GLOB_RECURSE"]
    assert any("${MIMCORE_SOURCE_DIR}/*.py" in g and "CONFIGURE_DEPENDS" in g for g in globs)
    build = [args for c, args in commands if c == "slicermacrobuildscriptedmodule"]
    assert len(build) == 1 and "${MIMCORE_PYTHON_SCRIPTS}" in build[0]
    # only .py files are bundled: a data file in mimcore would need its own install rule
    others = [f for f in mimcore_files() if not f.endswith(".py")]
    assert not others, f"mimcore holds non-Python files the CMake glob does not ship: {others}"


def test_self_test_is_registered_and_defined():
    commands = cmake_commands(MODULE_DIR / "CMakeLists.txt")
    assert ("slicer_add_python_unittest", ["SCRIPT", "${MODULE_NAME}.py"]) in commands
    tree = ast.parse((MODULE_DIR / f"{MODULE}.py").read_text(encoding="utf-8"))
    classes = {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}
    for name, base in ((MODULE, "ScriptedLoadableModule"), (f"{MODULE}Widget", "ScriptedLoadableModuleWidget"),
                       (f"{MODULE}Logic", "ScriptedLoadableModuleLogic"), (f"{MODULE}Test", "ScriptedLoadableModuleTest")):
        assert name in classes and base in [getattr(b, "id", None) for b in classes[name].bases], name
    test_methods = {f.name for f in classes[f"{MODULE}Test"].body if isinstance(f, ast.FunctionDef)}
    assert "runTest" in test_methods and any(m.startswith("test_") for m in test_methods)


# ---------------------------------------------------------------------------------------
# a real CMake configure against a stand-in for Slicer's CMake API

SLICER_CONFIG = r"""
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/GenerateConfig.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/CPack.cmake)
set(Slicer_FOUND TRUE)
"""

USE_SLICER = r"""
set(MANIFEST ${CMAKE_BINARY_DIR}/manifest.txt)
file(WRITE ${MANIFEST} "")
# ctkMacroCompilePythonScript's destination rules: a relative file keeps its path below
# the module folder; an absolute one keeps its path relative to CMAKE_CURRENT_BINARY_DIR.
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): ${MY_UNPARSED_ARGUMENTS}")
  endif()
  file(APPEND ${MANIFEST} "MODULE|${MY_NAME}|${MY_WITH_GENERIC_TESTS}\n")
  foreach(kind SCRIPTS RESOURCES)
    foreach(f ${MY_${kind}})
      if(IS_ABSOLUTE ${f})
        set(src ${f})
        if(kind STREQUAL "RESOURCES")
          message(FATAL_ERROR "absolute RESOURCES are not supported by ctkMacroCompilePythonScript: ${f}")
        endif()
        file(RELATIVE_PATH dst ${CMAKE_CURRENT_BINARY_DIR} ${f})
      else()
        set(src ${CMAKE_CURRENT_SOURCE_DIR}/${f})
        set(dst ${f})
      endif()
      if(NOT EXISTS ${src})
        message(FATAL_ERROR "slicerMacroBuildScriptedModule(${kind}) given nonexistent file '${f}'")
      endif()
      file(APPEND ${MANIFEST} "${kind}|${src}|${dst}\n")
    endforeach()
  endforeach()
endmacro()
function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "SLICER_ARGS;TESTNAME_PREFIX" ${ARGN})
  file(APPEND ${MANIFEST} "UNITTEST|${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT}\n")
endfunction()
"""

GENERATE_CONFIG = r"""
foreach(var EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_CONTRIBUTORS EXTENSION_DESCRIPTION
            EXTENSION_ICONURL EXTENSION_SCREENSHOTURLS EXTENSION_DEPENDS)
  file(APPEND ${MANIFEST} "META|${var}|${${var}}\n")
endforeach()
file(APPEND ${MANIFEST} "META|PROJECT_NAME|${PROJECT_NAME}\n")
"""

CPACK = r"""
file(APPEND ${MANIFEST} "CPACK\n")
"""


def _have_cmake_toolchain() -> str | None:
    if not shutil.which("cmake"):
        return "cmake is not installed"
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        return "no C compiler for project()"
    return None


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    reason = _have_cmake_toolchain()
    if reason:
        pytest.skip(f"real CMake configure skipped: {reason}")
    tmp = tmp_path_factory.mktemp("cmake")
    shim = tmp / "slicer"
    shim.mkdir()
    for name, text in (("SlicerConfig.cmake", SLICER_CONFIG), ("UseSlicer.cmake", USE_SLICER),
                       ("GenerateConfig.cmake", GENERATE_CONFIG), ("CPack.cmake", CPACK)):
        (shim / name).write_text(text)
    build = tmp / "build"
    proc = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={shim}", "-DBUILD_TESTING=ON"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"cmake configure failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    manifest = [line.split("|") for line in (build / "manifest.txt").read_text(encoding="utf-8").splitlines() if line]
    return {"manifest": manifest, "build": build, "tmp": tmp, "log": proc.stdout}


@pytest.fixture(scope="module")
def installed(configured):
    """The module folder as the extension package would install it."""
    dest = configured["tmp"] / "qt-scripted-modules"
    for row in configured["manifest"]:
        if row[0] in ("SCRIPTS", "RESOURCES"):
            target = dest / row[2]
            assert not target.exists(), f"two files install to {row[2]}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(row[1], target)
    return dest


def test_cmake_evaluates_the_metadata_the_static_checks_read(configured, top_sets):
    meta = {row[1]: row[2] for row in configured["manifest"] if row[0] == "META"}
    assert meta["PROJECT_NAME"] == MODULE
    for key, values in top_sets.items():
        if key.startswith("EXTENSION_"):
            assert meta[key] == ";".join(values), key
    kinds = [row[0] for row in configured["manifest"]]
    assert kinds.index("CPACK") > max(i for i, k in enumerate(kinds) if k == "META"), "CPack comes last"
    assert ["UNITTEST", str(MODULE_DIR / f"{MODULE}.py")] in configured["manifest"]
    assert ["MODULE", MODULE, "TRUE"] in configured["manifest"]


def test_installed_tree_holds_every_module_and_mimcore_file(installed):
    shipped = sorted(p.relative_to(installed).as_posix() for p in installed.rglob("*") if p.is_file())
    expected = sorted([f"{MODULE}.py", *module_python_files(),
                       *(f"mimcore/{f}" for f in mimcore_files()),
                       *(p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*")
                         if p.is_file())])
    assert shipped == expected, (f"missing: {sorted(set(expected) - set(shipped))}, "
                                 f"unexpected: {sorted(set(shipped) - set(expected))}")
    for f in mimcore_files():
        assert (installed / "mimcore" / f).read_bytes() == (MIMCORE_DIR / f).read_bytes(), f


def _run_in_installed_tree(installed: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=installed.parent)


def test_installed_tree_imports_on_its_own(installed):
    """Every MiMSlicerLib and mimcore module imports from the installed folder alone (not
    from this checkout), and the requirements resource is found next to it."""
    modules = [f"MiMSlicerLib.{Path(p).stem}" for p in module_python_files() if not p.endswith("__init__.py")]
    modules += ["mimcore." + f[:-3].replace("/", ".").removesuffix(".__init__") for f in mimcore_files()
                if f.endswith(".py") and f != "__main__.py"]
    code = f"""
import importlib, json, sys
from pathlib import Path
root = Path({str(installed)!r}).resolve()
bad = []
for name in {modules!r}:
    module = importlib.import_module(name)
    if root not in Path(module.__file__).resolve().parents:
        bad.append(f"{{name}} came from {{module.__file__}}")
from MiMSlicerLib import dependencies
reqs = dependencies.load_requirements()
print(json.dumps({{"bad": bad, "requirements": dependencies.REQUIREMENTS_FILE.as_posix(), "n": len(reqs)}}))
"""
    proc = _run_in_installed_tree(installed, code)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["bad"] == []
    assert report["requirements"] == (installed / "Resources" / "requirements.txt").resolve().as_posix()
    assert report["n"] > 5


def test_installed_mimcore_runs_as_the_job_runner_starts_it(installed):
    proc = _run_in_installed_tree(installed, "", "-m", "mimcore", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "segment" in proc.stdout and "finetune" in proc.stdout
