#!/usr/bin/env bash
# Install the project with its dev tools into .venv, then run ruff and the test suite.
# This is the README's test command and what CI runs (.ci/run calls this script).
#
#   bash scripts/test.sh                 # everything that can run here (GPU tests skip on CPU)
#   bash scripts/test.sh -m "not slow"   # extra arguments go to pytest
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/install.sh --dev
venv="${ATTNRES_VENV:-$root/.venv}"

"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .

set +e
"$venv/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "test.sh: pytest collected no tests (exit code 5); treating this as a failure" >&2
  exit 1
fi
exit "$rc"
