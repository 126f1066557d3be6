#!/usr/bin/env bash
# Create .venv with Python 3.12 and install megatron-attnres into it.
#
#   bash scripts/install.sh            # project + runtime dependencies, exact versions from the lock
#   bash scripts/install.sh --dev      # ... plus pytest and ruff
#   bash scripts/install.sh --no-lock  # keep the interpreter's own torch (NGC images): the venv sees
#                                      # system site-packages and torch is pinned to that version
#
# Environment: ATTNRES_PYTHON=/path/to/python3.12 picks the interpreter; ATTNRES_VENV=DIR moves the
# virtual environment (default: .venv in the repository root).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ATTNRES_VENV:-$root/.venv}"
extras=""
use_lock=1
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    --no-lock) use_lock=0 ;;
    *) echo "install.sh: unknown option '$arg' (expected --dev or --no-lock)" >&2; exit 2 ;;
  esac
done

is_py312() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; }

find_python312() {
  if [ -n "${ATTNRES_PYTHON:-}" ]; then
    if is_py312 "$ATTNRES_PYTHON"; then echo "$ATTNRES_PYTHON"; return 0; fi
    echo "install.sh: ATTNRES_PYTHON=$ATTNRES_PYTHON is not a working Python 3.12" >&2; return 1
  fi
  local cand
  for cand in python3.12 python3 python /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if command -v "$cand" >/dev/null 2>&1 && is_py312 "$(command -v "$cand")"; then
      command -v "$cand"; return 0
    fi
  done
  # pyenv installs 3.12 without making it the default: its shim answers "command not found"
  # until a 3.12 version is selected, so ask pyenv for the newest installed 3.12.x directly.
  if command -v pyenv >/dev/null 2>&1; then
    local ver
    for ver in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -t. -k3,3nr); do
      cand="$(pyenv root)/versions/$ver/bin/python3.12"
      if is_py312 "$cand"; then echo "$cand"; return 0; fi
    done
  fi
  if command -v uv >/dev/null 2>&1; then
    cand="$(uv python find 3.12 2>/dev/null || true)"
    if [ -n "$cand" ] && is_py312 "$cand"; then echo "$cand"; return 0; fi
  fi
  return 1
}

if ! py="$(find_python312)"; then
  cat >&2 <<'MSG'
install.sh: no Python 3.12 interpreter found (megatron-core 0.19.2 needs Python >= 3.12; this
project is tested on 3.12). Install one and run this script again, for example:
  pyenv install 3.12            # then nothing else: pyenv versions are found automatically
  apt-get install python3.12 python3.12-venv
  uv python install 3.12
or point at an existing interpreter: ATTNRES_PYTHON=/path/to/python3.12 bash scripts/install.sh
MSG
  exit 1
fi

if [ ! -x "$venv/bin/python" ] || ! is_py312 "$venv/bin/python"; then
  echo "install.sh: creating $venv with $py"
  rm -rf "$venv"
  if [ "$use_lock" = 1 ]; then
    "$py" -m venv "$venv"
  else  # see the interpreter's own packages (an NGC container's torch, TransformerEngine)
    "$py" -m venv --system-site-packages "$venv"
  fi
fi

# torch's Linux wheel brings ~3 GB of CUDA wheels (~6 GB installed). pip's cache would keep a second
# copy of every download, so it is off unless ATTNRES_PIP_CACHE=1; pip's temporary files go beside
# the environment (a small tmpfs /tmp would otherwise run out), and are removed afterwards.
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
if [ "${ATTNRES_PIP_CACHE:-0}" != 1 ]; then pip+=(--no-cache-dir); fi
pip_tmp="$(dirname "$venv")/.pip-tmp"
mkdir -p "$pip_tmp"
trap 'rm -rf "$pip_tmp"' EXIT
export TMPDIR="$pip_tmp"
free_kb="$(df -Pk "$pip_tmp" | awk 'NR == 2 {print $4}')"
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((9 * 1024 * 1024)) ] \
   && ! "$venv/bin/python" -c 'import torch, megatron.core' >/dev/null 2>&1; then
  echo "install.sh: warning: only $((free_kb / 1024)) MiB free at $pip_tmp; a fresh install of torch" \
       "(with its CUDA wheels) needs about 9 GiB there. Free some space or set ATTNRES_VENV to a" \
       "larger disk if pip reports 'No space left on device'." >&2
fi
"${pip[@]}" install -q --upgrade "pip>=24"
constraint=()
if [ "$use_lock" = 1 ]; then
  constraint=(-c "$root/requirements/lock.txt")
elif torch_version="$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
  # Keep the torch that is already there (NGC builds are pre-release versions such as
  # 2.9.0a0+abc that a plain ">=" requirement would not accept): pin it exactly.
  echo "torch==$torch_version" > "$pip_tmp/keep-torch.txt"
  constraint=(-c "$pip_tmp/keep-torch.txt")
  echo "install.sh: keeping the installed torch $torch_version"
fi
echo "install.sh: installing megatron-attnres$extras (lock: $([ "$use_lock" = 1 ] && echo yes || echo no))"
"${pip[@]}" install "${constraint[@]}" -e "$root$extras"
echo "install.sh: done; the environment is $venv"
