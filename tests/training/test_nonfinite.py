"""The NaN/Inf policy's parts, in one process on the trainer's tiny model: a NaN injected into
one expert's output (or its gradient, or a depth read) makes train_step skip the update and
leave every weight and the router's expert bias as they were, and `locate` names the sublayer,
expert or depth read the fault was put in (the oracle: where the test put it)."""

from types import SimpleNamespace

import pytest
import torch

from tests.training.conftest import tiny_model

pytestmark = [pytest.mark.mcore]


def _state(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (expert biases included)."""
    return {
        k: v.detach().clone()
        for k, v in model.chunks[0].module.state_dict().items()
        if isinstance(v, torch.Tensor)
    }


def _step(model, step: int):
    from megatron_attnres.train import faults
    from megatron_attnres.train.engine import train_step

    faults.begin_step(step)
    model.scheduler.step(increment=model.run.global_batch_size)  # warm-up starts at lr 0
    return train_step(model.chunks, model.optimizer, model.batch(step), skip_nonfinite=True)


def _locate(model, step: int) -> dict:
    from megatron_attnres.train.engine import forward_backward
    from megatron_attnres.train.nonfinite import locate

    batch = model.batch(step)
    return locate(model.chunks, lambda: forward_backward(model.chunks, batch, forward_only=True))


def _injected(monkeypatch, spec: str):
    from megatron_attnres.train import faults

    monkeypatch.setenv("ATTNRES_INJECT_NAN", spec)
    model = tiny_model()
    faults.install(model.chunks)
    return model


def test_a_skipped_step_changes_nothing_and_names_the_expert(megatron_rank, monkeypatch):
    model = _injected(monkeypatch, "step=2,sublayer=4,expert=1")
    assert not _step(model, 1).nonfinite
    before = _state(model)
    result = _step(model, 2)
    assert result.nonfinite and result.skipped and result.loss != result.loss  # NaN
    after = _state(model)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    location = _locate(model, 2)
    assert location["where"] == "sublayer 4 (MoE), expert 1"
    assert location["module"] == "decoder.layers.3.mlp.experts.local_experts.1"
    assert (location["sublayer"], location["expert"], location["phase"]) == (4, 1, "forward")
    # Negative control: the next (clean) step updates the weights and the expert bias.
    assert not _step(model, 3).nonfinite
    moved = _state(model)
    bias = "decoder.layers.3.mlp.router.expert_bias"
    assert not torch.equal(moved[bias], after[bias])
    assert not torch.equal(
        moved["embedding.word_embeddings.weight"], after["embedding.word_embeddings.weight"]
    )


def test_a_nan_gradient_is_traced_to_its_expert(megatron_rank, monkeypatch):
    model = _injected(monkeypatch, "step=1,sublayer=6,expert=2,into=grad")
    assert _step(model, 1).nonfinite
    location = _locate(model, 1)
    assert location["phase"] == "backward"  # every forward output was finite
    assert location["where"] == "sublayer 6 (MoE), expert 2"
    assert location["module"].startswith("decoder.layers.5.mlp.experts.local_experts.2")


def test_a_nan_in_a_depth_read_is_located(megatron_rank):
    model = tiny_model()
    read = model.chunks[0].module.decoder.depth_reads[2]  # the read before sublayer 3
    read.register_forward_hook(lambda module, args, out: out * float("nan"))
    assert _step(model, 1).nonfinite
    location = _locate(model, 1)
    assert location["where"] == "the depth read before sublayer 3"
    assert (location["sublayer"], location["expert"]) == (3, None)


@pytest.mark.parametrize(
    ("policy", "most", "skipped", "action"),
    [
        ("skip", 2, 0, "skip"),
        ("skip", 2, 1, "skip"),
        ("skip", 2, 2, "stop"),
        ("skip", 0, 0, "stop"),
        ("stop", 5, 0, "stop"),
    ],
)
def test_the_policy_skips_up_to_max_skipped_steps(policy, most, skipped, action):
    from megatron_attnres.train.nonfinite import decide

    run = SimpleNamespace(nan_policy=policy, max_skipped_steps=most)
    location = {
        "where": "sublayer 4 (MoE), expert 1",
        "module": "m",
        "sublayer": 4,
        "expert": 1,
        "phase": "forward",
        "rank": 0,
    }
    verdict = decide(run, skipped, 7, location)
    assert verdict.record["action"] == action and verdict.record["expert"] == 1
    assert "step 7: non-finite loss or gradient, from sublayer 4 (MoE), expert 1" in verdict.message
    if action == "skip":
        assert verdict.stop_reason is None and verdict.record["skipped_steps"] == skipped + 1
    else:
        assert "saving the last good state (step 6)" in verdict.message
        assert verdict.stop_reason.startswith("non-finite values at step 7")


def test_bad_policy_settings_are_refused():
    from megatron_attnres.config.rules import check_nan_policy

    with pytest.raises(ValueError, match="nan_policy='ignore'; use skip"):
        check_nan_policy(SimpleNamespace(nan_policy="ignore", max_skipped_steps=1))
    with pytest.raises(ValueError, match="max_skipped_steps=-1 must be >= 0"):
        check_nan_policy(SimpleNamespace(nan_policy="skip", max_skipped_steps=-1))
