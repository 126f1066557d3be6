"""bf16 training on the CPU, as on a GPU: bf16 weights and activations, megatron-core's
mixed-precision optimizer with fp32 main parameters (Float16OptimizerWithFloat16Params), fp32
gradient reduction, depth reads computed in fp32. The oracle is the same run in fp32: its loss
curve, within the bf16 tolerance of attnres.tolerances, and an uninterrupted bf16 run for
resume (bitwise)."""

import pytest
import torch

from megatron_attnres.attnres.tolerances import tolerance
from tests.training.trainer_runs import checkpoint_tensors, metrics, train

pytestmark = [pytest.mark.slow]
CURVE = ["--train-iters", "60", "--lr-wsd-decay-iters", "12"]


def test_bf16_follows_the_fp32_loss_curve_with_fp32_main_params(tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    train(fp32, *CURVE, "--bf16", "false")
    train(bf16, *CURVE, "--bf16", "true")
    want, got = metrics(fp32), metrics(bf16)
    rtol = tolerance(torch.bfloat16).rtol
    for step in (10, 30, 60):
        error = abs(got[step]["loss"] - want[step]["loss"]) / want[step]["loss"]
        assert error <= rtol, f"step {step}: bf16 {got[step]['loss']} vs fp32 {want[step]['loss']}"
    assert want[60]["loss"] < want[1]["loss"] - 1.0  # both runs learn
    assert got[1]["loss"] != want[1]["loss"]  # the runs really differ in precision

    state = checkpoint_tensors(bf16 / "checkpoints/iter_0000060", tmp_path)
    model = ("embedding.", "decoder.", "output_layer.")
    weights = {
        k: v
        for k, v in state.items()
        if k.startswith(model) and isinstance(v, torch.Tensor) and not k.endswith("expert_bias")
    }  # the router's expert-bias buffers stay fp32 (megatron-core keeps them so)
    assert weights and all(v.dtype == torch.bfloat16 for v in weights.values())
    assert "decoder.depth_reads.3.pseudo_query" in weights  # AttnRes parameters too
    main = [v for k, v in state.items() if k.startswith("optimizer.state.fp32_param.")]
    assert len(main) == len(weights) and all(v.dtype == torch.float32 for v in main)
    for key in ("embedding.word_embeddings.weight", "decoder.depth_reads.3.pseudo_query"):
        # The bf16 weight is the rounded fp32 main parameter.
        master = state[f"optimizer.state.fp32_param.{key}"]
        assert torch.equal(master.to(torch.bfloat16), weights[key])


def test_bf16_resume_equals_the_straight_run_bitwise(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, "--bf16", "true")
    first = train(split, "--bf16", "true", "--exit-interval", "10")
    assert "stopping at step 10: exit_interval=10" in first.stdout
    resumed = train(split, "--bf16", "true", "--load", str(split / "checkpoints"))
    assert "resumed from" in resumed.stdout
    want, got = metrics(straight), metrics(split)
    assert [got[s]["loss"] for s in range(1, 21)] == [want[s]["loss"] for s in range(1, 21)]
    a = checkpoint_tensors(straight / "checkpoints/iter_0000020", tmp_path)
    b = checkpoint_tensors(split / "checkpoints/iter_0000020", tmp_path)
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert a.keys() == b.keys() and [k for k in tensors if not torch.equal(a[k], b[k])] == []
