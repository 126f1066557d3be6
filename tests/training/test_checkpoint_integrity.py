"""Checkpoint integrity, in one process on the trainer's tiny model: a save is verified before it
is renamed; torn or corrupt checkpoints (missing or truncated data files or .metadata, a tracker
naming a missing directory, a leftover iter_N.tmp) are detected and the previous good one is
chosen, with a warning naming both; the newest K are kept; the model config a checkpoint records
is checked on load; megatron's writer runs without a helper process. The oracles are the
corruptions made here and the weights saved here."""

import multiprocessing
import queue
import shutil
from pathlib import Path

import pytest
import torch

from tests.training.conftest import tiny_model

pytestmark = [pytest.mark.mcore]


def _save(model, save, iteration, keep=None, signature="model"):
    from megatron_attnres.train.checkpointing import Progress, save_checkpoint

    progress = Progress(iteration=iteration, consumed_samples=8 * iteration)
    signature = model.signature if signature == "model" else signature
    return save_checkpoint(
        save,
        model.chunks,
        model.optimizer,
        model.scheduler,
        progress,
        signature=signature,
        keep_last=keep,
    )


def _weights(model) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.chunks[0].module.state_dict().items()
        if isinstance(v, torch.Tensor)
    }


def _perturb(model) -> None:
    with torch.no_grad():
        for param in model.chunks[0].parameters():
            param.add_(0.5)


def _step(model, seed: int = 0) -> None:
    from megatron_attnres.train.engine import train_step

    model.scheduler.step(increment=model.run.global_batch_size)  # warm-up starts at lr 0
    train_step(model.chunks, model.optimizer, model.batch(seed))


@pytest.fixture(scope="module")
def saved(megatron_rank, tmp_path_factory):
    """SAVE with iter 2, 4 and 6 of the tiny model (a training step between saves), and the
    weights each holds."""
    model = tiny_model()
    save, weights = tmp_path_factory.mktemp("ckpt") / "checkpoints", {}
    for iteration in (2, 4, 6):
        _step(model, iteration)
        weights[iteration] = _weights(model)
        _save(model, save, iteration)
    return model, save, weights


def _copy(saved, tmp_path):
    return shutil.copytree(saved[1], tmp_path / "checkpoints")


def test_a_complete_checkpoint_verifies_and_each_tear_is_named(saved, tmp_path):
    from megatron_attnres.checkpoint.files import verify

    save = _copy(saved, tmp_path)
    assert verify(save / "iter_0000006") is None
    tears = {
        "iter_0000002": (lambda d: (d / ".metadata").unlink(), ".metadata cannot be read"),
        "iter_0000004": (lambda d: (d / "metadata.json").unlink(), "metadata.json is missing"),
        "iter_0000006": (lambda d: (d / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
    }
    for name, (tear, message) in tears.items():
        tear(save / name)
        assert message in verify(save / name), name
    good = shutil.copytree(saved[1] / "iter_0000006", tmp_path / "again")
    with (good / "__0_0.distcp").open("r+b") as f:
        f.truncate(1000)
    assert "__0_0.distcp is truncated (1000 bytes; the metadata needs" in verify(good)
    (good / ".metadata").write_bytes(b"\x80\x04garbage")
    assert ".metadata cannot be read" in verify(good)
    assert "does not exist" in verify(tmp_path / "nowhere")


def test_a_corrupt_latest_falls_back_to_the_previous_good_one(saved, tmp_path):
    from megatron_attnres.checkpoint.files import choose

    save = _copy(saved, tmp_path)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "6\n"
    assert choose(save).iteration == 6 and choose(save).notes == []
    with (save / "iter_0000006" / "__0_0.distcp").open("r+b") as f:
        f.truncate(4096)
    (save / "iter_0000008.tmp").mkdir()  # an interrupted save
    choice = choose(save)
    assert choice.iteration == 4 and choice.path == save / "iter_0000004"
    assert any("ignoring iter_0000008.tmp" in note for note in choice.notes)
    [warning] = [note for note in choice.notes if note.startswith("WARNING")]
    assert f"checkpoint {save / 'iter_0000006'} is unusable" in warning
    assert "truncated" in warning and f"falling back to {save / 'iter_0000004'}" in warning


def test_the_tracker_decides_and_a_missing_target_falls_back(saved, tmp_path):
    from megatron_attnres.checkpoint.files import TRACKER, choose

    save = _copy(saved, tmp_path)
    tracker = save / TRACKER
    tracker.write_text("8\n")  # names a directory that is not there
    choice = choose(save)
    assert choice.iteration == 6
    assert any("iter_0000008 does not exist" in n and "falling back" in n for n in choice.notes)
    tracker.write_text("4\n")  # rolled back by hand: newer checkpoints are ignored
    choice = choose(save)
    assert choice.iteration == 4 and any("ignoring iter_0000006" in n for n in choice.notes)
    tracker.write_text("latest\n")
    choice = choose(save)
    assert choice.iteration == 6 and "not an iteration number" in choice.notes[0]
    tracker.unlink()
    assert choose(save).iteration == 6
    assert choose(tmp_path / "empty").iteration is None


def test_no_usable_checkpoint_is_an_error_naming_each(saved, tmp_path):
    from megatron_attnres.checkpoint.files import choose

    save = _copy(saved, tmp_path)
    for name in ("iter_0000002", "iter_0000004", "iter_0000006"):
        (save / name / ".metadata").unlink()
    with pytest.raises(FileNotFoundError, match="no usable checkpoint") as err:
        choose(save)
    assert all(f"iter_000000{i}: its .metadata cannot be read" in str(err.value) for i in (2, 4, 6))


def test_loading_after_a_fallback_restores_the_previous_weights(saved, tmp_path):
    from megatron_attnres.train.checkpointing import find_checkpoint, load_checkpoint

    model, _, weights = saved
    save = _copy(saved, tmp_path)
    (save / "iter_0000006" / "__0_0.distcp").unlink()
    _perturb(model)
    choice = find_checkpoint(save)
    loaded = load_checkpoint(
        choice.path, model.chunks, model.optimizer, model.scheduler, signature=model.signature
    )
    assert loaded.progress.iteration == 4 and loaded.progress.consumed_samples == 32
    assert loaded.weights_only is None and "at step 4" in loaded.summary()
    now = _weights(model)
    assert all(torch.equal(now[k], weights[4][k]) for k in weights[4])
    assert not torch.equal(
        now["embedding.word_embeddings.weight"], weights[6]["embedding.word_embeddings.weight"]
    )


def test_keep_last_removes_older_checkpoints_after_the_tracker(saved, tmp_path):
    from megatron_attnres.checkpoint.files import prune

    model = saved[0]
    save = _copy(saved, tmp_path)
    (save / "iter_0000012").mkdir()  # left by a run rolled back through the tracker
    (save / "iter_0000003.tmp").mkdir()
    _save(model, save, 8, keep=2)
    names = sorted(p.name for p in save.iterdir() if p.name.startswith("iter_"))
    assert names == ["iter_0000006", "iter_0000008", "iter_0000012"]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "8\n"
    assert prune(save, 8, None) == [] and prune(save, 12, 1) == [
        save / "iter_0000006",
        save / "iter_0000008",
    ]


def test_a_save_that_fails_verification_is_not_renamed(megatron_rank, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    from megatron_attnres.train import checkpointing

    model = tiny_model()
    _step(model)
    save = tmp_path / "checkpoints"
    _save(model, save, 1)
    real_save = dist_checkpointing.save

    def torn_save(state, directory):  # the writer "loses" a data file
        real_save(state, directory)
        min(Path(directory).glob("*.distcp")).unlink()

    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", torn_save)
    with pytest.raises(RuntimeError, match="failed verification after saving: its data file"):
        _save(model, save, 2)
    assert not (save / "iter_0000002").exists()
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1\n"


def test_the_writer_runs_in_this_process(saved):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # megatron-core's default is a spawn-context Manager queue: a helper process that takes
    # ~10 s to start and outlives a SIGKILLed trainer, holding its stdout open.
    assert isinstance(filesystem_async._results_queue, queue.Queue)
    assert multiprocessing.active_children() == []


def test_the_recorded_model_config_is_checked_on_load(saved, tmp_path, megatron_rank):
    from megatron_attnres.train.checkpointing import load_checkpoint

    model, save, _ = saved
    other = tiny_model("--hidden-size", "32", "--num-experts", "8")
    with pytest.raises(ValueError, match="was saved from a different model") as err:
        load_checkpoint(
            save / "iter_0000006",
            other.chunks,
            other.optimizer,
            other.scheduler,
            signature=other.signature,
        )
    assert "hidden_size: checkpoint 64, this run 32" in str(err.value)
    assert "num_moe_experts: checkpoint 4, this run 8" in str(err.value)
    assert "num_attention_heads" not in str(err.value)
    old = tmp_path / "old"
    _save(model, old, 3, signature=None)  # as written before checkpoints carried the config
    loaded = load_checkpoint(
        old / "iter_0000003",
        model.chunks,
        model.optimizer,
        model.scheduler,
        signature=model.signature,
    )
    assert loaded.progress.iteration == 3
    assert "records no model config" in loaded.notes[0]


def test_bad_checkpoint_options_are_refused(tmp_path):
    from megatron_attnres.config.rules import check_checkpoint_options
    from megatron_attnres.config.run import RunConfig

    run_dir = str(tmp_path)
    check_checkpoint_options(RunConfig(run_dir=run_dir, keep_last_checkpoints=None))
    with pytest.raises(ValueError, match="keep_last_checkpoints=0 must be >= 1"):
        check_checkpoint_options(RunConfig(run_dir=run_dir, keep_last_checkpoints=0))
    with pytest.raises(ValueError, match="finetune=true needs load"):
        check_checkpoint_options(RunConfig(run_dir=run_dir, finetune=True))
    with pytest.raises(ValueError, match="every restart would load the run's own latest"):
        check_checkpoint_options(
            RunConfig(run_dir=run_dir, finetune=True, load=f"{run_dir}/checkpoints")
        )
