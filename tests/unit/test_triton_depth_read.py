"""The fused Triton depth reads (training kernel in megatron_attnres/kernels, two-phase inference
kernels shipped with HF exports) against the PyTorch ops, under Triton's CPU interpreter.

The cases live in triton_interpreter_cases.py and run in a fresh process with TRITON_INTERPRET=1
set before anything imports triton: triton's own @triton.jit library functions (tl.zeros, ...)
are only interpreted when the variable is set at import, and this pytest process has imported
triton long before (megatron-core does at import time).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("triton_interpreter_cases.py")
ROOT = CASES.parents[2]


def test_triton_kernels_match_the_pytorch_ops_under_the_interpreter():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env |= {"TRITON_INTERPRET": "1", "ATTNRES_DEPTH_READ": "auto"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            str(CASES),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 17, output
    assert "failed" not in result.stdout and "skipped" not in result.stdout, output
