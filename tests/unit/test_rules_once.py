"""Each configuration rule has one definition (issue 20): the places that need it ask that
definition instead of restating it. A rule is found by a pattern of its arithmetic; every match
must sit in the same function of the same file."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_attnres"

# rule -> (pattern of its arithmetic, the file and function that define it)
RULES = {
    "expert tensor-parallel size = 1 under EP, else TP": (
        r"expert_model_parallel_size\s*>\s*1|\bep\s*>\s*1\s+else",
        ("config/megatron.py", "expert_tensor_parallel_size"),
    ),
    "experts divisible by the EP size": (
        r"experts\w*\s*%\s*(?:cfg\.)?(?:ep|expert_model_parallel_size)\b",
        ("mcore/config.py", "experts_split_problem"),
    ),
    "KDA heads and head dim divisible by TP": (
        r"whole KDA heads|must both be divisible|linear_(?:num_key_heads|key_head_dim)\s*%",
        ("mcore/kda.py", "check_kda_tensor_parallel"),
    ),
    "global batch = micro-batch x DP x k": (
        r"global_batch_size\s*(?:%|//)",
        ("config/rules.py", "microbatches_per_step"),
    ),
    "qk_layernorm needs MLA mixers": (
        r"qk_layernorm\s+and\s+\"\*\"\s+in|\"\*\"\s+in\s+\w+\s+and\s+[\w.]*qk_layernorm",
        ("mcore/model.py", "qk_layernorm_problem"),
    ),
}


def _enclosing_functions(path: Path) -> list[tuple[int, int, str]]:
    tree = ast.parse(path.read_text())
    return [
        (node.lineno, node.end_lineno, node.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def definitions(pattern: str, root: Path = PACKAGE) -> set[tuple[str, str]]:
    """(file relative to the package, innermost enclosing function) of every line matching."""
    found = set()
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        functions = None
        for number, line in enumerate(lines, start=1):
            code = line.split("#", 1)[0]
            if not re.search(pattern, code):
                continue
            functions = functions or _enclosing_functions(path)
            inside = [f for f in functions if f[0] <= number <= f[1]]
            name = min(inside, key=lambda f: f[1] - f[0])[2] if inside else "<module>"
            found.add((str(path.relative_to(root)), name))
    return found


@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_rule_has_one_definition(rule):
    pattern, where = RULES[rule]
    assert definitions(pattern) == {where}, f"{rule}: written in {sorted(definitions(pattern))}"


def test_the_finder_sees_a_restated_rule(tmp_path):
    # Negative control: a second copy of the expert-TP rule elsewhere is found.
    (tmp_path / "a.py").write_text(
        "def etp(run):\n    return 1 if run.expert_model_parallel_size > 1 else 2\n"
    )
    (tmp_path / "b.py").write_text("x = 1 if ep > 1 else tp\n")
    pattern = RULES["expert tensor-parallel size = 1 under EP, else TP"][0]
    assert definitions(pattern, tmp_path) == {("a.py", "etp"), ("b.py", "<module>")}


@pytest.mark.parametrize("ep", [1, 2])
def test_every_user_of_the_expert_tp_rule_gets_its_answer(ep):
    """The transformer config, the config checks and the dry-run layout agree with the rule."""
    from megatron_attnres.config.load import load_run_config
    from megatron_attnres.config.megatron import expert_tensor_parallel_size, transformer_config
    from megatron_attnres.train.layout import dry_run_layout

    overrides = dict(
        tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=ep
    )
    run = load_run_config(ROOT / "configs" / "tiny.yaml", overrides)
    expected = 1 if ep > 1 else 2
    assert expert_tensor_parallel_size(run) == expected
    assert transformer_config(run).expert_tensor_parallel_size == expected
    layout = dry_run_layout(run, world_size=4, gpus_per_node=4)
    assert layout["etp"] == expected
