"""`mim --help` and argument errors answer at once: building the parser imports neither
torch, MONAI nor SimpleITK (each command imports them only when it runs)."""

import subprocess
import sys

HEAVY = ("torch", "monai", "SimpleITK")


def test_building_the_parser_imports_no_heavy_library():
    code = ("import sys; import mimcore.cli.main as m; m.build_parser(); "
            f"print([n for n in {HEAVY!r} if n in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"parser build imported {out.strip()}"


def test_help_of_every_command_works():
    for cmd in ("data", "pretrain", "reconstruct", "models", "finetune", "segment", "evaluate"):
        proc = subprocess.run([sys.executable, "-m", "mimcore", cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "usage: mim " + cmd in proc.stdout
