"""The files of a checkpoint directory: names, the tracker, verification, what to resume from,
and pruning. Plain file-system code: no process group, no tensor is read.

    SAVE/iter_0000010/        one complete checkpoint (renamed from iter_0000010.tmp once verified)
    SAVE/iter_0000012.tmp/    a save in progress, or one a crash interrupted: never loaded
    SAVE/latest_checkpointed_iteration.txt   Megatron-LM's tracker: the iteration to resume from

`verify` is structural and cheap: megatron's metadata.json, torch.distributed.checkpoint's
.metadata (it names every data file and the byte range of every item in it), each named file
present and at least as long as its last byte range, and the common state readable. It catches
torn and truncated checkpoints, not flipped bits inside a file.
"""

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"
_COMPLETE = re.compile(r"iter_(\d{7,})")
_STAGING = re.compile(r"iter_(\d{7,})\.tmp")


def checkpoint_dir(save: str | Path, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def staging_dir(save: str | Path, iteration: int) -> Path:
    final = checkpoint_dir(save, iteration)
    return final.with_name(final.name + ".tmp")


def staged_iteration(path: str | Path) -> int | None:
    """N for a path inside (or naming) SAVE/iter_N.tmp, else None."""
    for part in reversed(Path(path).parts):
        match = _STAGING.fullmatch(part)
        if match:
            return int(match.group(1))
    return None


def saved_iterations(save: str | Path) -> list[int]:
    """Iterations with a complete-named iter_N directory under SAVE, ascending (unverified)."""
    save = Path(save)
    if not save.is_dir():
        return []
    found = (_COMPLETE.fullmatch(p.name) for p in save.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def write_tracker(save: str | Path, iteration: int) -> None:
    """Replace the tracker atomically (write, fsync, rename)."""
    tracker = Path(save) / TRACKER
    tmp = tracker.with_suffix(".tmp")
    with tmp.open("w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(tracker)


def verify(path: str | Path) -> str | None:
    """None when PATH looks like a complete dist checkpoint, else what is wrong with it."""
    from megatron.core.dist_checkpointing import load_common_state_dict
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist"
    if not (path / "metadata.json").is_file():
        return "its metadata.json is missing"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # a torn or truncated .metadata fails in many ways
        return f"its .metadata cannot be read ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        data = path / name
        if not data.is_file():
            return f"its data file {name} is missing"
        size = data.stat().st_size
        if size < end:
            return f"its data file {name} is truncated ({size} bytes; the metadata needs {end})"
    try:
        load_common_state_dict(str(path))
    except Exception as err:
        return f"its common state cannot be read ({type(err).__name__}: {err})"
    return None


@dataclass
class Choice:
    iteration: int | None = None  # None: nothing to resume from
    path: Path | None = None
    notes: list[str] = field(default_factory=list)  # warnings to print (rank 0)


def _tracked(load: Path, notes: list[str]) -> tuple[int | None, bool]:
    """(the tracker's iteration, whether a tracker file exists)."""
    tracker = load / TRACKER
    if not tracker.is_file():
        return None, False
    text = tracker.read_text().strip()
    if text.isdigit():
        return int(text), True
    notes.append(
        f"WARNING: checkpoint tracker {tracker} says {text!r}, not an iteration number; "
        "using the newest complete checkpoint instead (fix or delete the tracker to silence this)"
    )
    return None, True


def choose(load: str | Path) -> Choice:
    """The checkpoint to resume from under LOAD: the one the tracker names, or, when it is torn,
    corrupt or missing, the newest good one before it (with a warning naming both). Directories
    newer than the tracker are ignored (the tracker decides, as in Megatron-LM: rolling it back
    is how a run is restarted from an earlier checkpoint). Without a tracker, the newest good
    checkpoint. Raises when checkpoints exist but none is usable."""
    load, choice = Path(load), Choice()
    stale = sorted(p.name for p in load.glob("iter_*.tmp")) if load.is_dir() else []
    if stale:
        choice.notes.append(
            f"ignoring {', '.join(stale)} in {load}: interrupted saves (never loaded; the next "
            "save removes them)"
        )
    named, has_tracker = _tracked(load, choice.notes)
    complete = saved_iterations(load)
    if named is not None:
        newer = [checkpoint_dir(load, i).name for i in complete if i > named]
        if newer:
            choice.notes.append(
                f"ignoring {', '.join(newer)}: newer than the tracker ({named}), which decides"
            )
        order = [named, *(i for i in reversed(complete) if i < named)]
    else:
        order = list(reversed(complete))
        if complete and not has_tracker:
            choice.notes.append(f"no {TRACKER} in {load}; using its newest good checkpoint")
    problems = []
    for iteration in order:
        path = checkpoint_dir(load, iteration)
        problem = verify(path)
        if problem is None:
            if problems:
                unusable = "; ".join(
                    f"checkpoint {bad} is unusable ({why})" for bad, why in problems
                )
                choice.notes.append(f"WARNING: {unusable}; falling back to {path}")
            choice.iteration, choice.path = iteration, path
            return choice
        problems.append((checkpoint_dir(load, iteration), problem))
    if problems:
        listed = "; ".join(f"{path.name}: {problem}" for path, problem in problems)
        raise FileNotFoundError(
            f"no usable checkpoint in {load} ({listed}); restore one from a backup, or delete "
            f"{TRACKER} and the iter_* directories to start from scratch"
        )
    return choice


def prune(save: str | Path, current: int, keep: int | None) -> list[Path]:
    """Remove interrupted saves (iter_*.tmp) and all but the newest KEEP checkpoints up to and
    including CURRENT (None keeps every one). Checkpoints newer than CURRENT (left by a run that
    was rolled back through the tracker) are left alone. Returns what was removed."""
    save, removed = Path(save), []
    removed += [p for p in save.glob("iter_*.tmp") if p.is_dir()]
    if keep is not None:
        older = [i for i in saved_iterations(save) if i < current]
        removed += [checkpoint_dir(save, i) for i in older[: max(0, len(older) - (keep - 1))]]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
