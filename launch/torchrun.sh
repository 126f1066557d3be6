#!/usr/bin/env bash
# Start attnres-train with torchrun on this node (single node, or one node of a multi-node job).
#
#   launch/torchrun.sh --config configs/tiny.yaml [--key value ...]            # this node, all GPUs
#   launch/torchrun.sh --nproc-per-node 8 --config my.yaml --train-iters 1000
#   # two nodes, static master (run on each node with its own --node-rank):
#   launch/torchrun.sh --nnodes 2 --node-rank 0 --master-addr node0 --master-port 29500 --config my.yaml
#   # two nodes, c10d rendezvous (no fixed ranks needed):
#   launch/torchrun.sh --nnodes 2 --rdzv-endpoint node0:29400 --rdzv-id job42 --config my.yaml
#
# Launcher options (everything else goes to attnres-train):
#   --nproc-per-node G   processes on this node (default: the GPUs nvidia-smi lists, else 1)
#   --nnodes N           nodes in the job (default 1: --standalone rendezvous on this host)
#   --node-rank R        this node's rank (with --master-addr)
#   --master-addr H      address of node 0 (static rendezvous)  --master-port P (default 29500)
#   --rdzv-endpoint H:P  c10d rendezvous endpoint (instead of --master-addr)  --rdzv-id ID
# Environment: PYTHON (default: .venv/bin/python of this repository).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
nproc="" nnodes=1 node_rank="" master_addr="" master_port=29500 rdzv_endpoint="" rdzv_id=attnres
train_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc-per-node|--nproc_per_node) nproc="$2"; shift 2 ;;
    --nnodes) nnodes="$2"; shift 2 ;;
    --node-rank|--node_rank) node_rank="$2"; shift 2 ;;
    --master-addr|--master_addr) master_addr="$2"; shift 2 ;;
    --master-port|--master_port) master_port="$2"; shift 2 ;;
    --rdzv-endpoint|--rdzv_endpoint) rdzv_endpoint="$2"; shift 2 ;;
    --rdzv-id|--rdzv_id) rdzv_id="$2"; shift 2 ;;
    *) train_args+=("$1"); shift ;;
  esac
done
if [ -z "$nproc" ]; then
  nproc="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [ "${nproc:-0}" -ge 1 ] || nproc=1
fi

launcher=(--nproc-per-node "$nproc" --nnodes "$nnodes")
if [ -n "$rdzv_endpoint" ]; then
  launcher+=(--rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint" --rdzv-id "$rdzv_id")
elif [ -n "$master_addr" ]; then
  if [ -z "$node_rank" ]; then
    echo "torchrun.sh: --master-addr needs --node-rank (0 on the master node)" >&2; exit 2
  fi
  launcher+=(--node-rank "$node_rank" --master-addr "$master_addr" --master-port "$master_port")
elif [ "$nnodes" = 1 ]; then
  launcher+=(--standalone)
else
  echo "torchrun.sh: --nnodes $nnodes needs --master-addr (with --node-rank) or --rdzv-endpoint" >&2
  exit 2
fi
exec "$python" -m torch.distributed.run "${launcher[@]}" -m megatron_attnres.train "${train_args[@]}"
