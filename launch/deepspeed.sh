#!/usr/bin/env bash
# Start attnres-train with the DeepSpeed launcher: ssh/pdsh fan-out to the hosts of a hostfile,
# for clusters without Slurm. Training itself is the same as under torchrun (the trainer reads the
# RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT the launcher sets, and ignores the
# --local_rank=N it appends); DeepSpeed is used only as a launcher, not as an engine.
#
#   launch/deepspeed.sh [--key value ...]                  # this host, all GPUs, configs/tiny.yaml
#   NUM_GPUS=2 launch/deepspeed.sh --train-iters 50        # this host, 2 processes (also on CPU)
#   HOSTFILE=launch/hostfile CONFIG=configs/my.yaml RUN_DIR=runs/my launch/deepspeed.sh
#
# Environment (arguments of the script are trainer overrides too, placed after EXTRA_ARGS):
#   CONFIG       run config (default: configs/tiny.yaml of this repository)
#   RUN_DIR      run directory (default: the config's run_dir)
#   EXTRA_ARGS   trainer overrides, split on whitespace, e.g. "--train-iters 1000 --lr 3e-4"
#   HOSTFILE     DeepSpeed hostfile, one "hostname slots=G" line per host (launch/hostfile.example);
#                unset: this host only. Every host needs passwordless ssh, pdsh, and this
#                repository and its venv at the same path (the launcher cds to this directory and
#                runs this python there).
#   NUM_GPUS     processes per host (default: the hostfile's slots; without a hostfile the GPUs
#                nvidia-smi lists, else 1). On a CPU-only host it is simply the process count:
#                DeepSpeed falls back to its CPU accelerator and the ranks talk over gloo.
#   NUM_NODES    use only the first N hosts of the hostfile
#   MASTER_ADDR  address of rank 0 (default: the first host's `hostname -I`, 127.0.0.1 locally)
#   MASTER_PORT  rendezvous port (default 29500)
#   DS_LAUNCHER_ARGS  more options of the `deepspeed` launcher, e.g. "--launcher openmpi" or
#                "--ssh_port 2222" (--include/--exclude need NUM_GPUS and NUM_NODES unset)
#   PYTHON       interpreter with deepspeed installed (default: .venv/bin/python of this repo)
# Variables reach remote hosts only if their names start with NCCL, PYTHON, UCX, MV2 or MLFLOW,
# or are listed as NAME=value lines in ./.deepspeed_env or ~/.deepspeed_env (see launch/README.md).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
config="${CONFIG:-$root/configs/tiny.yaml}"

launcher=()
if [ -n "${HOSTFILE:-}" ]; then
  if [ ! -f "$HOSTFILE" ]; then
    echo "deepspeed.sh: HOSTFILE=$HOSTFILE does not exist; write one like" \
      "launch/hostfile.example, or unset HOSTFILE to run on this host" >&2
    exit 2
  fi
  launcher+=(--hostfile "$HOSTFILE")
  [ -z "${NUM_NODES:-}" ] || launcher+=(--num_nodes "$NUM_NODES")
else
  # /dev/null is not a regular file: DeepSpeed then uses this host only, instead of reading its
  # default /job/hostfile should one exist.
  launcher+=(--hostfile /dev/null)
  if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [ "${NUM_GPUS:-0}" -ge 1 ] || NUM_GPUS=1
  fi
fi
[ -z "${NUM_GPUS:-}" ] || launcher+=(--num_gpus "$NUM_GPUS")
[ -z "${MASTER_ADDR:-}" ] || launcher+=(--master_addr "$MASTER_ADDR")
[ -z "${MASTER_PORT:-}" ] || launcher+=(--master_port "$MASTER_PORT")
# shellcheck disable=SC2206  # word splitting of DS_LAUNCHER_ARGS and EXTRA_ARGS is the interface
launcher+=(${DS_LAUNCHER_ARGS:-})

train_args=(--config "$config")
[ -z "${RUN_DIR:-}" ] || train_args+=(--run-dir "$RUN_DIR")
# shellcheck disable=SC2206
train_args+=(${EXTRA_ARGS:-} "$@")

exec "$python" -m deepspeed.launcher.runner "${launcher[@]}" \
  --module megatron_attnres.train "${train_args[@]}"
