"""Read model tensors from, and write model-only checkpoints to, Megatron dist checkpoints.

Reading goes through torch.distributed.checkpoint (no process group, no model): a checkpoint
saved with any TP/PP/EP layout holds each tensor under its global name and shape, and DCP
assembles the requested tensors from however many rank files hold their pieces, reading only
those byte ranges. Writing goes through megatron.core.dist_checkpointing, as `attnres-train`
does, so the result loads into any layout.
"""

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_attnres.checkpoint import files as checkpoint_files
from megatron_attnres.checkpoint.files import TRACKER, checkpoint_dir, write_tracker
from megatron_attnres.checkpoint.format import (
    CONFIG,
    MODEL_ONLY,
    model_state_key,
    use_in_process_writer,
)
from megatron_attnres.config.load import load_run_config
from megatron_attnres.config.run import RunConfig
from megatron_attnres.conversion.config_map import ConversionError


def resolve_checkpoint(path: str | Path) -> Path:
    """An iter_* directory, or a save directory (its latest checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(
            f"checkpoint {path} is not a directory; give a save directory "
            "(with latest_checkpointed_iteration.txt) or one iter_* directory"
        )
    if (path / ".metadata").is_file():
        return path
    try:
        choice = checkpoint_files.choose(path)  # the tracker's, or the newest good one
    except FileNotFoundError as error:
        raise ConversionError(str(error)) from None
    if choice.path is None:
        raise ConversionError(
            f"{path} holds no dist checkpoint: neither {path}/.metadata nor {path}/{TRACKER}; "
            "give an iter_* directory written by attnres-train"
        )
    for note in choice.notes:
        print(note)
    return choice.path


def checkpoint_run_config(checkpoint: Path, config: str | Path | None = None) -> RunConfig:
    """The run config that built the checkpoint's model: CONFIG, or the one beside the checkpoint
    (attnres-train writes SAVE/config.yaml)."""
    path = Path(config) if config else checkpoint.parent / CONFIG
    if not path.is_file():
        raise ConversionError(
            f"no run config for {checkpoint}: {path} does not exist; pass --config with the YAML "
            "the model was trained with"
        )
    try:
        return load_run_config(path)
    except (ValueError, FileNotFoundError) as error:
        raise ConversionError(f"run config {path}: {error}") from None


class MegatronCheckpoint:
    """Global tensors of one dist checkpoint, read on demand."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.metadata = FileSystemReader(str(path)).read_metadata()
        except Exception as error:  # a torn or foreign .metadata
            raise ConversionError(
                f"cannot read checkpoint metadata {path / '.metadata'}: {error}; the checkpoint is "
                "incomplete or corrupt (use an earlier iter_* directory)"
            ) from None
        self.tensors = {
            key: meta
            for key, meta in self.metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata)
        }
        self._check_files()

    def _check_files(self) -> None:
        """Every data file the metadata names exists and is long enough (a missing or truncated
        rank file is found before anything is written)."""
        needed: dict[str, int] = {}
        for info in (self.metadata.storage_data or {}).values():
            needed[info.relative_path] = max(
                needed.get(info.relative_path, 0), info.offset + info.length
            )
        for name, size in sorted(needed.items()):
            file = self.path / name
            if not file.is_file():
                raise ConversionError(
                    f"checkpoint file {file} is missing (named by {self.path / '.metadata'}); "
                    "copy the complete iter_* directory or use an earlier checkpoint"
                )
            if file.stat().st_size < size:
                raise ConversionError(
                    f"checkpoint file {file} has {file.stat().st_size} bytes but the metadata "
                    f"needs {size}; it is truncated: copy it again or use an earlier checkpoint"
                )

    def shape(self, key: str) -> torch.Size:
        return self.tensors[key].size

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def nbytes(self, key: str, as_dtype: torch.dtype | None = None) -> int:
        """Bytes of tensor KEY, stored or cast to AS_DTYPE."""
        return self.shape(key).numel() * (as_dtype or self.dtype(key)).itemsize

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        state = {k: torch.empty(self.shape(k), dtype=self.dtype(k)) for k in keys}
        dcp.load(state, storage_reader=FileSystemReader(str(self.path)), no_dist=True)
        return state


def write_model_only(tensors: dict[str, torch.Tensor], out: Path, common: dict) -> Path:
    """OUT/iter_0000000 (a model-only dist checkpoint: global tensors, any layout loads it) and
    OUT/latest_checkpointed_iteration.txt. Needs a (one-rank) process group."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    target = checkpoint_dir(out, 0)
    target.mkdir(parents=True)
    model = {k: ShardedTensor.from_rank_offsets(k, t, replica_id=0) for k, t in tensors.items()}
    use_in_process_writer()  # no helper process (see its docstring)
    dist_checkpointing.save({model_state_key(0, 1): model, MODEL_ONLY: True, **common}, str(target))
    write_tracker(out, 0)
    return target


def one_rank_process_group() -> bool:
    """A one-rank gloo group on an in-process store (dist_checkpointing needs a group); True
    when it was started here (the caller then ends it), False when one already existed."""
    import torch.distributed as dist

    from megatron_attnres.mcore.compat import activate_cpu_compat, cpu_compat_needed

    if cpu_compat_needed():
        activate_cpu_compat()
    if dist.is_initialized():
        return False
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True
