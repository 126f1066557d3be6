# megatron-attnres on NVIDIA's PyTorch container (CUDA, NCCL, TransformerEngine, Python 3.12).
#
#   docker build -t megatron-attnres .
#   docker run --gpus all --ipc=host --rm -v $PWD/runs:/workspace/megatron-attnres/runs \
#       megatron-attnres attnres-train --config configs/tiny.yaml
#
# The project is installed with the README's install script; --no-lock keeps the container's own
# torch build (and TransformerEngine) instead of the CPU/CI lock file.
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /workspace/megatron-attnres
COPY . .
RUN ATTNRES_PYTHON="$(command -v python3)" bash scripts/install.sh --no-lock \
    && .venv/bin/attnres-train --help > /dev/null
ENV PATH=/workspace/megatron-attnres/.venv/bin:$PATH
CMD ["attnres-train", "--help"]
