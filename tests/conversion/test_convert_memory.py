"""attnres-convert-to-hf streams: exporting a 2.3 GB checkpoint into 8 shards of 269-319 MB, the
exporting process's peak RSS minus its RSS right after the imports stays below 2x the largest
shard (measured in a fresh process from the kernel's high-water mark, VmHWM)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_attnres.config.load import dump
from megatron_attnres.config.run import RunConfig
from megatron_attnres.conversion.config_map import run_fields
from megatron_attnres.conversion.hf.configuration_attnres import AttnResConfig
from megatron_attnres.conversion.key_table import key_table
from megatron_attnres.conversion.megatron_io import write_model_only
from megatron_attnres.conversion.to_hf import expected_hf_shapes
from tests.training.trainer_runs import ROOT, clean_env

pytestmark = [pytest.mark.slow, pytest.mark.mcore]
NEEDED_DISK = 6 * 10**9  # the checkpoint and the export, 2.3 GB each, plus slack

# 8 layers of MoE (8 experts) at hidden 2048: 2.3 GB in fp32; with 320 MB shards the export has
# 8 shards of 269-319 MB. The largest tensor (134 MB) is under half a shard: the reader holds a
# tensor and its one stored chunk at once, as megatron's writer stores each rank's piece.
CONFIG = dict(
    vocab_size=8192,
    hidden_size=2048,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=4096,
    moe_intermediate_size=1024,
    num_experts=8,
    num_experts_per_token=2,
    num_shared_experts=1,
    first_k_dense_replace=0,
    mixer_types=["full_attention"] * 8,
    attn_res_mode="block",
    attn_res_block_size=2,
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
)
SHARD = "320MB"

# getrusage's ru_maxrss would be wrong here: Linux carries it over from the forking (pytest)
# process. VmHWM belongs to the new address space of the exec'd interpreter.
MEASURE = """
import json, sys
import psutil
from megatron_attnres.conversion.to_hf import convert_to_hf
def high_water():
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    return int(status.split()[0]) * 1024  # kB
after_imports = psutil.Process().memory_info().rss
convert_to_hf(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3], log=lambda _: None)
print(json.dumps({"after_imports": after_imports, "peak": high_water()}))
"""


def write_random_checkpoint(save, tokenizer_model) -> None:
    cfg = AttnResConfig(**CONFIG)
    hf_shapes = expected_hf_shapes(cfg)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for row in key_table(cfg):
        metas = [torch.empty(hf_shapes[name], device="meta") for name in row.hf]
        shape = row.to_megatron(metas).shape
        tensors[row.megatron] = torch.empty(shape).normal_(0.0, 0.02, generator=generator)
    write_model_only(tensors, save, common={})
    (save / "config.yaml").write_text(dump(RunConfig(**run_fields(cfg))))
    shutil.copyfile(tokenizer_model, save / "tokenizer.model")


def test_export_peak_memory_is_below_two_shards(tmp_path, tokenizer_model, megatron_one_rank):
    if shutil.disk_usage(tmp_path).free < NEEDED_DISK:
        pytest.skip(f"needs {NEEDED_DISK / 1e9:.0f} GB free in {tmp_path}")
    write_random_checkpoint(tmp_path / "megatron", tokenizer_model)
    out = tmp_path / "hf"
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "megatron"), str(out), SHARD],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    sizes = [s.stat().st_size for s in shards]
    assert len(shards) == 8 and min(sizes) >= 256 * 2**20, sizes
    growth = rss["peak"] - rss["after_imports"]
    print(f"peak RSS growth {growth / 2**20:.0f} MiB; largest shard {max(sizes) / 2**20:.0f} MiB")
    assert growth < 2 * max(sizes), (growth, max(sizes))
