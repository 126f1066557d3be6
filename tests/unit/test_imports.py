"""Layering: attnres imports torch only; imports point downward (STYLE.md)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_attnres"
# Subpackage -> the project subpackages it must not import.
FORBIDDEN = {
    "attnres": {"mcore", "training", "conversion", "data"},
    "mcore": {"training", "conversion"},
    "data": {"attnres", "mcore", "training", "conversion"},
    "kernels": {"mcore", "training", "conversion", "data"},
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_attnres_imports_only_torch_and_the_standard_library():
    for path in (PACKAGE / "attnres").rglob("*.py"):
        for name in imported_modules(path):
            top = name.split(".")[0]
            allowed = (
                top == "torch"
                or top in sys.stdlib_module_names
                or (name.startswith("megatron_attnres.attnres"))
            )
            assert allowed, f"{path.relative_to(PACKAGE)} imports {name}"


@pytest.mark.parametrize("subpackage", sorted(FORBIDDEN))
def test_imports_point_downward(subpackage):
    for path in (PACKAGE / subpackage).rglob("*.py"):
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "megatron_attnres" and len(parts) > 1:
                assert parts[1] not in FORBIDDEN[subpackage], (
                    f"{path.relative_to(PACKAGE)} imports {name}"
                )


def test_importing_attnres_loads_no_megatron_module():
    code = (
        "import sys, megatron_attnres.attnres, megatron_attnres.attnres.reference\n"
        "bad = sorted(m for m in sys.modules if m == 'megatron' or m.startswith('megatron.'))\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_checker_catches_a_megatron_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from megatron.core import parallel_state\nimport torch\n")
    assert "megatron.core" in imported_modules(bad)
