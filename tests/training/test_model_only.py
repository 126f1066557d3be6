"""Starting from weights alone. (1) The contract with `attnres-convert-from-hf`: a model-only
checkpoint (SAVE/iter_0000000 written by megatron.core.dist_checkpointing with the model's
sharded state dict and {"model_only": True} in the common state, plus the tracker) is loaded by
`attnres-train --load SAVE`, which starts at step 0 with a fresh optimizer. (2) `finetune: true`
loads the weights of a full checkpoint the same way. (3) A restart of that run resumes from its
own save directory, not from `load` again. The oracle: with lr = 0 (and no expert-bias update)
a step leaves the weights as loaded, so the run's checkpoint must hold exactly the weights the
test wrote, which the trainer's own initialisation cannot reproduce."""

import pytest
import torch
from megatron.core import dist_checkpointing

from tests.training.conftest import tiny_model
from tests.training.trainer_runs import checkpoint_tensors, metrics, train

pytestmark = [pytest.mark.slow]

# One step that leaves the weights as they are: lr 0 and a zero expert-bias update rate.
FROZEN = [
    "--lr",
    "0",
    "--min-lr",
    "0",
    "--lr-warmup-iters",
    "0",
    "--lr-wsd-decay-iters",
    "1",
    "--moe-router-bias-update-rate",
    "0",
    "--vocab-size",
    "1024",
]


def _model_tensors(path, scratch) -> dict[str, torch.Tensor]:
    every = checkpoint_tensors(path, scratch)
    return {
        k: v
        for k, v in every.items()
        if isinstance(v, torch.Tensor) and not k.startswith("optimizer")
    }


@pytest.fixture(scope="module")
def model_only(megatron_rank, tmp_path_factory):
    """SAVE/iter_0000000 holding the tiny model with weights drawn here (std 0.05, seed 7)."""
    from megatron_attnres.checkpoint.files import write_tracker
    from megatron_attnres.checkpoint.format import use_in_process_writer

    model = tiny_model(vocab=1024).chunks[0].module
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    save = tmp_path_factory.mktemp("converted") / "checkpoints"
    (save / "iter_0000000").mkdir(parents=True)
    use_in_process_writer()
    state = {"model": model.sharded_state_dict(), "model_only": True}
    dist_checkpointing.save(state, str(save / "iter_0000000"))
    write_tracker(save, 0)
    return save


def test_a_model_only_checkpoint_starts_a_run_at_step_0(model_only, tmp_path):
    run_dir = tmp_path / "run"
    done = train(run_dir, *FROZEN, "--train-iters", "1", "--load", str(model_only))
    assert (
        f"loaded model weights only from {model_only / 'iter_0000000'} (a model-only "
        "checkpoint); starting at step 0 with a fresh optimizer" in done.stdout
    )
    assert "records no model config" in done.stdout  # the converter's may not carry one
    assert sorted(metrics(run_dir)) == [1]
    written = _model_tensors(model_only / "iter_0000000", tmp_path)
    trained = _model_tensors(run_dir / "checkpoints" / "iter_0000001", tmp_path)
    assert written.keys() == trained.keys() and len(written) > 50
    assert [k for k in written if not torch.equal(written[k], trained[k])] == []


def test_finetune_loads_weights_only_and_a_restart_resumes_its_own_run(model_only, tmp_path):
    source = tmp_path / "source"
    train(source, *FROZEN, "--train-iters", "1", "--load", str(model_only))
    run_dir = tmp_path / "run"
    args = [*FROZEN, "--load", str(source / "checkpoints"), "--finetune", "true"]
    done = train(run_dir, *args, "--train-iters", "2")
    assert "(finetune=true); starting at step 0 with a fresh optimizer" in done.stdout
    assert sorted(metrics(run_dir)) == [1, 2]  # counted from 0, not from the source's step 1
    weights = _model_tensors(model_only / "iter_0000000", tmp_path)
    tuned = _model_tensors(run_dir / "checkpoints" / "iter_0000002", tmp_path)
    assert [k for k in weights if not torch.equal(weights[k], tuned[k])] == []

    again = train(run_dir, *args, "--train-iters", "3")  # e.g. a torchrun restart
    assert "auto-resume:" in again.stdout and "takes precedence over" in again.stdout
    assert f"resumed from {run_dir / 'checkpoints'} at step 2 " in again.stdout
    assert "finetune=true" not in again.stdout.split("auto-resume:")[1]
