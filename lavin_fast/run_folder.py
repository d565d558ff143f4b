"""A run folder belongs to one run: held by one trainer at a time, refused to a fresh run while it
holds another run's files, and readable after whatever a crash leaves behind.

What `lavin_fast.train` writes into `--out`:
    .trainer.lock          fcntl.flock-ed by the trainer writing the folder; holds its pid
    run_config.json        the resolved TrainConfig; paths inside the folder stored relative to it
    log.jsonl, loss.png, adapters.safetensors, checkpoints/step-N/, checkpoints/latest.json
    data/, backbones/      what `--fake-data` and `--preset tiny` made for the run

What a crash can leave, and what the next start does with it: `*.tmp` files of an atomic write
(removed); a torn last line of log.jsonl (dropped, with a warning); a damaged latest.json or a
damaged or incomplete newest checkpoint (`--resume` falls back to the newest checkpoint that
loads, and says which it skipped).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from lavin_fast.errors import UserError
from lavin_fast.io import atomic_write_text, read_json_object

log = logging.getLogger("lavin_fast.train")

LOCK_FILE = ".trainer.lock"
# A folder holding any of these holds a run: a fresh run there would rewrite or delete them.
RUN_OUTPUTS = ("log.jsonl", "adapters.safetensors", "checkpoints")
# Everything a trainer writes, moved aside together by --overwrite (run_config.json's relative
# paths then still point at the old run's own data and backbones).
WRITTEN_BY_A_RUN = ("run_config.json", "log.jsonl", "loss.png", "adapters.safetensors", "checkpoints",
                    "data", "backbones")
PATH_FIELDS = ("llama", "clip", "tokenizer", "adapters", "data_root", "alpaca", "llava", "llava_images")
# TrainConfig fields a --resume may change: the run's length, where and how often it writes, and
# the parallel layout (a DCP checkpoint loads into any). Every other field is the recipe.
MAY_CHANGE_ON_RESUME = frozenset({"max_steps", "epochs", "out", "resume", "overwrite", "progress", "save_every",
                                  "keep_checkpoints", "dp", "tp", "sequence_parallel", "gradient_checkpointing"})
_STEP_FOLDER = re.compile(r"step-(\d+)")


class RunFolderError(UserError):
    """A mistake about the run folder (`--out`, `--resume`, `--overwrite`), said in one line."""


# ---------------------------------------------------------------------------------------------
# One trainer per folder
# ---------------------------------------------------------------------------------------------

class RunLock:
    """An exclusive `fcntl.flock` on `folder/.trainer.lock` for the life of a run. The kernel
    drops it when its process dies, so the lock file a killed trainer left is simply taken over."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._handle = None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666), "r+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunFolderError(f"{self.folder} is in use by another trainer (pid {holder}): wait for it to "
                                 "finish, or choose another --out") from None
        previous = handle.read().strip()
        if previous:     # a clean release empties the file: this pid's trainer never released it
            log.warning("%s: taking over the lock of pid %s, a trainer that stopped without releasing it",
                        self.folder, previous)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is None:
            return
        # Emptied, not removed: removing it would let a trainer that opened the old file and one
        # that creates a new one both hold "the" lock.
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.flush()
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None


def claim(out: Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Lock `out` for this run and make sure it is this run's: a fresh run into a folder holding
    another run is refused, or with `overwrite` the other run is moved aside (never deleted).
    Leftover `*.tmp` files of a killed write are removed. Returns the held lock."""
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in --out and --overwrite moves it aside: pass only one")
    lock = RunLock(out)
    lock.acquire()
    try:
        if not resume and holds_a_run(out):
            if not overwrite:
                raise RunFolderError(f"{out} holds another run (its log, checkpoints or adapters): pass --resume to "
                                     "continue it, choose another --out, or pass --overwrite to move it aside")
            log.warning("moved the previous run in %s aside to %s", out, move_aside(out))
        remove_leftover_tmp(out)
    except BaseException:
        lock.release()
        raise
    return lock


def holds_a_run(out: Path) -> bool:
    return any((out / name).is_file() or (out / name).is_dir() and any((out / name).iterdir())
               for name in RUN_OUTPUTS)


def move_aside(out: Path) -> Path:
    """Move what a trainer wrote in `out` (and the eval outputs kept there) into a new
    `out/replaced-<UTC time>/`; returns that folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = out / f"replaced-{stamp}"
    for n in range(2, 1000):
        if not target.exists():
            break
        target = out / f"replaced-{stamp}-{n}"
    target.mkdir()
    for path in [out / name for name in WRITTEN_BY_A_RUN] + sorted(out.glob("eval-*")):
        if path.exists():
            os.replace(path, target / path.name)
    return target


def remove_leftover_tmp(out: Path) -> None:
    """The `*.tmp` files an atomic write (or DCP) was killed in the middle of, in the places a
    trainer writes: nothing else in the folder is touched."""
    folders = [out, out / "checkpoints"]
    for _, checkpoint in checkpoints(out):
        folders += [checkpoint, checkpoint / "dcp"]
    for folder in folders:
        for path in folder.glob("*.tmp"):
            if path.is_file():
                path.unlink()
                log.info("removed %s, left by a write that was cut short", path)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoints/step-N/`, oldest first by step number."""
    found = []
    for path in (out / "checkpoints").glob("step-*"):
        match = _STEP_FOLDER.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def named_checkpoint(out: Path) -> Path | None:
    """The checkpoint `checkpoints/latest.json` names, or None when there is none or the file is
    damaged (a warning says so) or names a folder that is not there."""
    pointer = out / "checkpoints" / "latest.json"
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["dir"]
    except (ValueError, KeyError, TypeError) as error:
        log.warning("%s is damaged (%s): looking for the newest checkpoint that loads", pointer, error)
        return None
    if not isinstance(name, str) or not _STEP_FOLDER.fullmatch(name) or not (out / "checkpoints" / name).is_dir():
        log.warning("%s names %r, which is not a checkpoint folder here: looking for the newest one that loads",
                    pointer, name)
        return None
    return out / "checkpoints" / name


def write_pointer(out: Path, folder: Path, step: int) -> None:
    atomic_write_text(out / "checkpoints" / "latest.json", json.dumps({"dir": folder.name, "step": step}))


def rotate(out: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints (by step number), never the one latest.json
    names. keep <= 0 keeps every checkpoint."""
    if keep <= 0:
        return
    named = named_checkpoint(out)
    for _, path in checkpoints(out)[:-keep]:
        if path != named:
            shutil.rmtree(path, ignore_errors=True)


def remove_checkpoints_after(out: Path, step: int) -> None:
    """A resumed run replays the steps after its checkpoint: later checkpoints (an abandoned
    continuation, or the damaged ones it skipped) would collide with the ones it writes."""
    for later, path in checkpoints(out):
        if later > step:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s (after the resumed step %d)", path, step)


def load_newest(out: Path, load: Callable[[Path], dict]) -> tuple[Path, dict] | None:
    """`load(folder)` of the checkpoint to resume from: the one latest.json names, else (or when it
    fails to load) the newest older one that loads; each skipped one is named in a warning. None
    when the run has no checkpoint yet. A load whose `step` does not match the folder counts as
    damaged. Raises RunFolderError when checkpoints exist and none of them loads."""
    found = checkpoints(out)
    named = named_checkpoint(out)
    if named is not None:
        named_step = next(step for step, path in found if path == named)
        candidates = [named] + [path for step, path in reversed(found) if step < named_step]
    else:
        candidates = [path for _, path in reversed(found)]
    skipped = []
    for path in candidates:
        if not (path / "extra.pt").is_file():     # written last: the save was killed before the end
            reason = "incomplete (no extra.pt)"
        else:
            try:
                extra = load(path)
                if extra.get("step") != int(_STEP_FOLDER.fullmatch(path.name).group(1)):
                    raise ValueError(f"it holds step {extra.get('step')!r}")
                if skipped:
                    log.warning("resuming from %s; skipped %s", path.name, "; ".join(skipped))
                return path, extra
            except Exception as error:      # whatever a damaged file makes the loaders raise
                reason = f"damaged ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        skipped.append(f"{path.name}: {reason}")
    if any("damaged" in s for s in skipped):
        raise RunFolderError(f"no checkpoint in {out / 'checkpoints'} loads ({'; '.join(skipped)}): "
                             "nothing to resume from")
    if skipped:
        log.warning("no complete checkpoint in %s (%s): starting from step 0", out / "checkpoints", "; ".join(skipped))
    return None


# ---------------------------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------------------------

def read_log_until(path: Path, step: int) -> list[dict]:
    """The log's records up to `step`, rewritten without later ones (a resumed run replays the
    steps after its checkpoint and logs them again) and without lines a crash cut short."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    records, unreadable = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            unreadable.append(number)
    if unreadable:
        log.warning("%s: dropped unreadable line(s) %s (a write cut short by a crash); kept %d records",
                    path, ", ".join(map(str, unreadable)), len(records))
    kept = [r for r in records if r["step"] <= step]
    if len(kept) != len(records) or unreadable or (text and not text.endswith("\n")):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


# ---------------------------------------------------------------------------------------------
# run_config.json
# ---------------------------------------------------------------------------------------------

def storable_config(values: dict, out: Path) -> dict:
    """`values` (TrainConfig fields) with its paths as run_config.json keeps them: relative to the
    run folder where they are inside it (the folder can move), absolute elsewhere (any cwd)."""
    root = Path(out).resolve()
    stored = dict(values)
    for name in PATH_FIELDS:
        if stored.get(name) is not None:
            path = Path(stored[name]).resolve()
            stored[name] = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    return stored


def read_run_config(run: Path) -> dict:
    """The TrainConfig fields of a run folder's run_config.json, its relative paths joined to
    where the folder is now."""
    run = Path(run)
    config_file = run / "run_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run} is not a training run folder (no run_config.json)")
    values = read_json_object(config_file, RunFolderError)
    for name in PATH_FIELDS:
        if isinstance(values.get(name), str):
            values[name] = str(run / values[name])    # an absolute path stays what it is
    return values


def check_resume_recipe(out: Path, values: dict) -> None:
    """Refuse a `--resume` whose recipe (`values`, TrainConfig fields) differs from the one in
    run_config.json, naming the keys. The run's length and layout may change
    (MAY_CHANGE_ON_RESUME); keys an older run_config.json lacks are not compared."""
    config_file = out / "run_config.json"
    if not config_file.is_file():
        return
    stored = read_json_object(config_file, RunFolderError)
    given = storable_config(values, out)
    differ = [f"{key} (stored {stored[key]!r}, given {given[key]!r})" for key in given
              if key not in MAY_CHANGE_ON_RESUME and key in stored and stored[key] != given[key]]
    if differ:
        raise RunFolderError(f"--resume with a recipe different from {config_file}: {', '.join(differ)}; resume "
                             "with the stored values, or start a new run with another --out")
