"""Our code never unpickles what it reads: no torch.load without weights_only=True, no
pickle/dill/shelve/marshal, no eval/exec, no yaml.load without a safe loader, no numpy.load with
allow_pickle=True (megatron-core's and torch's own internals are theirs to answer for). The
checker is an AST walk; the oracle for the checker itself is a file of known violations."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = [ROOT / "megatron_attnres", ROOT / "tools"]
OWN_RESULTS = {"megatron_attnres/testing/launcher.py"}
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
SAFE_YAML = {"SafeLoader", "CSafeLoader"}


def _name(node) -> str:
    """'torch.load' for torch.load, 'x.y.load' for x.y.load, '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _call_problem(call: ast.Call) -> str | None:
    name = _name(call.func)
    last = name.rsplit(".", 1)[-1]
    if name in ("eval", "exec"):
        return f"{name}()"
    torch_load = name == "torch.load" or name.endswith(".torch.load")
    if torch_load and not _is_true(_keyword(call, "weights_only")):
        return f"{name} without weights_only=True"
    if name.split(".")[0] == "yaml" and last in ("load", "load_all"):
        loader = _keyword(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
        if _name(loader).rsplit(".", 1)[-1] not in SAFE_YAML:
            return f"{name} without SafeLoader (use yaml.safe_load)"
    if name.split(".")[0] == "yaml" and last in ("unsafe_load", "full_load", "unsafe_load_all"):
        return f"{name} (use yaml.safe_load)"
    numpy_load = last == "load" and name.split(".")[0] in ("np", "numpy")
    if numpy_load and _is_true(_keyword(call, "allow_pickle")):
        return f"{name} with allow_pickle=True"
    if last == "read_pickle":
        return f"{name}"
    return None


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """'file:line: what' for each unsafe deserialisation in SOURCE."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        problem = None
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] in UNPICKLERS]
            problem = f"import {', '.join(bad)}" if bad else None
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNPICKLERS:
                problem = f"from {node.module} import ..."
            elif node.module == "torch" and any(a.name == "load" for a in node.names):
                problem = "from torch import load (call torch.load(..., weights_only=True))"
        elif isinstance(node, ast.Call):
            problem = _call_problem(node)
        if problem:
            found.append(f"{filename}:{node.lineno}: {problem}")
    return found


def test_our_code_loads_nothing_unsafely():
    files = [path for folder in OURS for path in sorted(folder.rglob("*.py"))]
    assert len(files) > 30  # the walk found the package
    # Test support (it lived in tests/ before issue 20): the gloo launcher reads back what its
    # own worker processes wrote into its private temporary directory.
    files = [path for path in files if path.relative_to(ROOT).as_posix() not in OWN_RESULTS]
    found = [
        hit for path in files for hit in unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert found == []


def test_the_checker_catches_each_unsafe_load():
    bad = """
import pickle
import dill as d
from shelve import open
from torch import load
import torch, yaml, numpy as np
torch.load(path)
torch.load(path, weights_only=False)
yaml.load(text)
yaml.load(text, Loader=yaml.FullLoader)
yaml.unsafe_load(text)
np.load(path, allow_pickle=True)
eval(text)
exec(text)
"""
    found = unsafe_loads(bad)
    assert len(found) == 12, found
    good = """
import torch, yaml, json, numpy as np
torch.load(path, weights_only=True)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
np.load(path)
json.loads(text)
model.eval()
"""
    assert unsafe_loads(good) == []
