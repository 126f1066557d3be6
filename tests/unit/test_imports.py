"""Layering (docs/architecture.md section 9): every package of megatron_attnres says which of our
packages it may import, imports point one way, there is no import circle, production code never
imports the test-support package, and a converter loads nothing of the trainer."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_attnres"
# Package -> the project packages it may import (besides itself). Every package must be listed,
# so a new one has to be placed in the layering before its first test run passes.
ALLOWED = {
    "attnres": set(),
    "kernels": {"attnres"},
    "data": set(),
    "mcore": {"attnres", "kernels"},
    "config": {"attnres", "mcore", "data"},
    "checkpoint": {"config", "mcore"},
    "conversion": {"attnres", "kernels", "mcore", "config", "checkpoint", "data"},
    "train": {"attnres", "kernels", "mcore", "config", "data", "checkpoint"},
    "study": {"attnres", "kernels", "mcore", "config", "data", "checkpoint", "train"},
    "bench": {"attnres", "kernels", "mcore", "config", "data", "checkpoint", "train", "conversion"},
    "testing": {
        "attnres",
        "kernels",
        "mcore",
        "config",
        "data",
        "checkpoint",
        "train",
        "conversion",
    },
}
# The trainer's modules: a converter must run without them (no DDP, optimizer, fault hooks).
TRAINER = "megatron_attnres.train"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of everything `path` imports (module level or inside functions); relative
    imports are resolved against the file's package."""
    here = _module_name(path) if path.is_relative_to(PACKAGE) else ""
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _project_modules() -> set[str]:
    return {_module_name(path) for path in _sources()}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a `from pkg import name` that names a module
    counts as importing that module)."""
    modules = _project_modules()
    return {
        _module_name(path): {n for n in imported_modules(path) if n in modules}
        - {_module_name(path)}
        for path in _sources()
    }


def test_every_package_is_placed_in_the_layering():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(ALLOWED)
    top_modules = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert top_modules == [], f"modules outside any package: {top_modules}"


def test_attnres_imports_only_torch_and_the_standard_library():
    for path in (PACKAGE / "attnres").rglob("*.py"):
        for name in imported_modules(path):
            top = name.split(".")[0]
            allowed = (
                top == "torch"
                or top in sys.stdlib_module_names
                or name.startswith("megatron_attnres.attnres")
            )
            assert allowed, f"{path.relative_to(PACKAGE)} imports {name}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    for path in (PACKAGE / package).rglob("*.py"):
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "megatron_attnres" and len(parts) > 1 and parts[1] != package:
                assert parts[1] in ALLOWED[package], (
                    f"{path.relative_to(PACKAGE)} imports {name}: {package}/ may import only "
                    f"{sorted(ALLOWED[package])}"
                )


def test_nothing_imports_study_and_production_never_imports_testing():
    for path in _sources():
        importer = (_module_name(path).split(".") + [""])[1]
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] != "megatron_attnres" or len(parts) < 2:
                continue
            assert parts[1] != "study" or importer == "study", f"{path} imports {name}"
            assert parts[1] != "testing" or importer == "testing", f"{path} imports {name}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, or None (depth-first search with an explicit path)."""
    state: dict[str, str] = {}
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [], [(start, iter(sorted(graph[start])))]
        state[start] = "open"
        path.append(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = "done"
            elif state.get(child) == "open":
                return path[path.index(child) :] + [child]
            elif child not in state:
                state[child] = "open"
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def test_there_is_no_import_circle_inside_the_package():
    assert _cycle(import_graph()) is None, " -> ".join(_cycle(import_graph()))


def test_the_circle_finder_finds_a_circle():
    # Negative control for the test above: run_config -> config_checks -> model_setup ->
    # run_config was the circle before the refactor.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _loaded_after(statement: str) -> list[str]:
    code = (
        f"import sys\n{statement}\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('megatron_attnres'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_importing_attnres_loads_no_megatron_module():
    code = (
        "import sys, megatron_attnres.attnres, megatron_attnres.attnres.reference\n"
        "bad = sorted(m for m in sys.modules if m == 'megatron' or m.startswith('megatron.'))\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "module", ["megatron_attnres.conversion.to_hf", "megatron_attnres.conversion.from_hf"]
)
def test_a_converter_loads_no_module_of_the_trainer(module):
    loaded = _loaded_after(f"import {module}")
    assert module in loaded  # the probe itself works
    trainer = [m for m in loaded if m == TRAINER or m.startswith(TRAINER + ".")]
    assert trainer == [], f"importing {module} loads {trainer}"


def test_the_trainer_probe_sees_the_trainer():
    # Negative control: the same probe on the trainer's entry point lists the trainer modules.
    loaded = _loaded_after("import megatron_attnres.train.trainer")
    assert {"megatron_attnres.train.engine", "megatron_attnres.train.faults"} <= set(loaded)


def test_the_checker_catches_a_megatron_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from megatron.core import parallel_state\nimport torch\n")
    assert "megatron.core" in imported_modules(bad)


def test_relative_imports_are_resolved():
    hf = PACKAGE / "conversion" / "hf" / "modeling_attnres.py"
    assert "megatron_attnres.conversion.hf.configuration_attnres" in imported_modules(hf)
