"""The Dockerfile (it cannot be built here: no Docker daemon, no NGC access) installs with the
README's install script, keeping the container's torch, on a pinned NGC PyTorch base."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [tuple(ln.split(None, 1)) for ln in lines]


def test_base_image_is_a_pinned_ngc_pytorch_release():
    bases = [arg for op, arg in _instructions() if op == "FROM"]
    assert len(bases) == 1
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", bases[0]), bases[0]


def test_installs_with_the_readme_script_keeping_the_container_torch():
    runs = [arg for op, arg in _instructions() if op == "RUN"]
    assert any("bash scripts/install.sh --no-lock" in run for run in runs), runs
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/install.sh" in readme.split("```bash\n")[1].split("```")[0]
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert "--system-site-packages" in install and "keep-torch.txt" in install


def test_build_context_leaves_out_local_environments():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv/" in ignored and "runs/" in ignored
