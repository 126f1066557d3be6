"""The setup scripts: README commands, CI entry point, interpreter discovery, pytest exit code 5."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL_AND_RUN = "bash scripts/install.sh && .venv/bin/attnres-train --config configs/tiny.yaml"
TEST_COMMAND = "bash scripts/test.sh"


def test_readme_opens_with_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    first_blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    assert first_blocks == [INSTALL_AND_RUN, TEST_COMMAND]


def test_ci_runs_the_readme_test_command():
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.startswith("exec")]
    assert lines == [f"exec {TEST_COMMAND}"]


def run_install(tmp_path, **env):
    full_env = {**os.environ, "ATTNRES_VENV": str(tmp_path / "venv"), **env}
    return subprocess.run(
        ["bash", "scripts/install.sh"], cwd=ROOT, env=full_env, capture_output=True, text=True
    )


def test_install_names_a_bad_interpreter(tmp_path):
    result = run_install(tmp_path, ATTNRES_PYTHON="/nonexistent/python3.12")
    assert result.returncode == 1
    assert "ATTNRES_PYTHON=/nonexistent/python3.12 is not a working Python 3.12" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_install_says_what_to_install_when_no_python312_exists(tmp_path):
    # Only a directory with a fake python3 that reports 3.11: no pyenv, no uv, no 3.12 anywhere.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("bash", "dirname", "grep", "sort", "cat", "rm"):
        (fake_bin / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    fake_python = fake_bin / "python3"
    fake_python.write_text("#!/bin/bash\nexit 1\n")
    fake_python.chmod(0o755)
    result = subprocess.run(
        [str(fake_bin / "bash"), "scripts/install.sh"],
        cwd=ROOT,
        env={"PATH": str(fake_bin), "ATTNRES_VENV": str(tmp_path / "venv")},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr
    assert "no Python 3.12 interpreter found" in result.stderr
    assert "pyenv install 3.12" in result.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.slow
def test_test_script_fails_when_pytest_collects_nothing():
    result = subprocess.run(
        ["bash", "scripts/test.sh", "-k", "no_test_has_this_name_zzz"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "collected no tests (exit code 5)" in result.stderr
