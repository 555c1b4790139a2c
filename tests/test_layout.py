"""The package's shape: commands do not lean on each other, configs ship in the wheel,
``import tfpneumo`` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tfpneumo"
# What each command runs; cli.py parses and calls one of these (demo and bench compose them).
ENTRY_MODULES = ("tfpneumo.data.synth", "tfpneumo.data.prepare", "tfpneumo.training.run",
                 "tfpneumo.training.parallel",
                 "tfpneumo.evaluation.report", "tfpneumo.inference.submission",
                 "tfpneumo.inference.pictures", "tfpneumo.inference.export")
COMMAND_LAYER = ("tfpneumo.cli", "tfpneumo.demo", "tfpneumo.bench", "tfpneumo.tune")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every tfpneumo module ``path`` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tfpneumo"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tfpneumo"))
    return found


def test_entry_modules_do_not_import_each_other_or_the_command_layer():
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if not name.startswith(ENTRY_MODULES):
            continue
        own = next(e for e in ENTRY_MODULES if name.startswith(e))
        bad = {m for m in imports_of(path)
               if m.startswith(ENTRY_MODULES + COMMAND_LAYER) and not m.startswith(own)}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_no_module_in_the_package_imports_the_cli():
    for path in PACKAGE.rglob("*.py"):
        if module_name(path) != "tfpneumo.cli":
            assert not {m for m in imports_of(path) if m.startswith("tfpneumo.cli")}, path


def test_import_tfpneumo_does_not_import_tensorflow():
    code = ("import sys, tfpneumo; tfpneumo.load_config; "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.slow
def test_the_wheel_ships_the_configs(tmp_path):
    """A non-editable install finds `tfpneumo demo`'s config inside the package."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                    str(PACKAGE.parent)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("tfpneumo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"tfpneumo/configs/{p.name}" for p in (PACKAGE / "configs").glob("*.yaml")}
    assert {"tfpneumo/configs/base.yaml", "tfpneumo/configs/demo.yaml"} <= shipped <= names
