"""Atomic training checkpoints: write into a temp folder, fsync, rename; keep the last K and the best; resume.

A checkpoint is ``RUN_DIR/checkpoints/step-NNNNNNN/``: what ``Accelerator.save_state`` writes (model,
optimizer, the registered scheduler, every process's RNG state; DeepSpeed's own shards under ZeRO)
plus ``trainer_state.json`` (step, best metric) and the resolved ``config.yaml``. It is written under a
``.tmp-`` name and renamed only when complete, so a folder named ``step-*`` is always whole: a save
killed half-way leaves a ``.tmp-`` folder that is ignored and cleaned up by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prima.errors import PrimaError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME_RE = re.compile(r"^step-(\d+)$")
_TIED_HEAD_NOTE = re.compile(r"Removed shared tensor \{'[\w.]*lm_head\.weight'\} while saving")


class _TiedHeadNote(logging.Filter):
    """Drop accelerate's per-save note that the LLM's output layer, tied to its input embeddings, is not
    stored twice: loading re-ties it (exact resume is tested). Any other shared tensor still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _TIED_HEAD_NOTE.search(record.getMessage())


logging.getLogger("accelerate.utils.other").addFilter(_TiedHeadNote())


class CheckpointError(PrimaError):
    pass


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Completed checkpoints of a run as ``(step, folder)``, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*"), reverse=True):  # files before the folders that hold them
        _fsync_path(p)
    _fsync_path(folder)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temp file and rename, so readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    accelerator: Any,
    run_dir: str | os.PathLike,
    step: int,
    trainer_state: dict[str, Any],
    *,
    config_text: str | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save the full training state at ``step`` atomically; every process must call this.

    ``write_extra(folder)`` (main process) writes more files into the checkpoint before it is completed.

    Returns the completed folder. An exception on the way (disk full, a kill) leaves earlier
    checkpoints untouched.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that was killed half-way
            shutil.rmtree(tmp)
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
            _discard(final)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if config_text is not None:
            (tmp / "config.yaml").write_text(config_text, encoding="utf-8")
        if write_extra is not None:
            write_extra(tmp)
        # the state file goes last: list_checkpoints only counts folders that have it
        write_json_atomic(tmp / STATE_FILE, {"step": step, **trainer_state})
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync_path(root)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, folder: str | os.PathLike) -> dict[str, Any]:
    """Restore model, optimizer, registered objects and RNG from ``folder``; returns its trainer state."""
    folder = Path(folder)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {STATE_FILE}); pick another one")
    handle = accelerator.register_load_state_pre_hook(_load_models_checked)
    try:
        accelerator.load_state(str(folder))
    finally:
        handle.remove()
    return json.loads(state_file.read_text(encoding="utf-8"))


def _load_models_checked(models: list, input_dir: str) -> None:
    # Accelerate would load model.safetensors strictly, so a frozen encoder whose module layout changed
    # (it is rebuilt from its own source anyway) would block every resume. Load it here instead: weights the
    # model reloads from their source (`external_weight_prefixes()`) may differ, anything else must match.
    for i, model in enumerate(list(models)):
        path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not path.is_file():
            return  # another format (e.g. pickled weights): accelerate loads it, strictly
        load_model_weights(getattr(model, "module", model), path)
    models.clear()


def load_model_weights(
    model: Any, path: str | os.PathLike, *, allow_missing: bool = False, skip: Callable[[str], bool] | None = None
) -> list[str]:
    """Load a checkpoint's model.safetensors; a CheckpointError naming the keys if trainable weights differ.

    Keys under ``model.external_weight_prefixes()`` (frozen weights rebuilt from their source) are skipped,
    and a missing key is fine when it shares storage with a loaded one (tied weights are saved once). With
    ``allow_missing`` (``train.init_from``: a model with new parts) weights the file lacks keep their fresh
    initialisation and are returned; unexpected keys and shape mismatches are an error either way. Keys
    for which ``skip`` is true are not loaded (with ``allow_missing``: they start fresh).
    """
    from prima.model.prima import read_weights

    external = tuple(model.external_weight_prefixes()) if hasattr(model, "external_weight_prefixes") else ()
    state = {
        k: v
        for k, v in read_weights(path).items()
        if not (external and k.startswith(external)) and not (skip and skip(k))
    }
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointError(
            f"{path} does not match the model: {len(mismatched)} weight(s) of another shape (file vs model) "
            f"{mismatched[:4]}; was the model config changed since?"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded_storage = {own[k].untyped_storage().data_ptr() for k in state if k in own}
    missing = [
        k
        for k in missing
        if not (external and k.startswith(external)) and own[k].untyped_storage().data_ptr() not in loaded_storage
    ]
    if (missing and not allow_missing) or unexpected:
        raise CheckpointError(
            f"{path} does not match the model: {len(missing)} missing weight(s) {missing[:4]}, "
            f"{len(unexpected)} unexpected {list(unexpected)[:4]}; was the model config or code changed since?"
        )
    return missing


def _discard(folder: Path) -> None:
    # rename first so a deletion interrupted half-way never leaves a partial `step-*` folder behind
    trash = folder.with_name(f".trash-{folder.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(folder, trash)
    shutil.rmtree(trash)


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, best_step: int | None) -> list[Path]:
    """Delete completed checkpoints except the newest ``keep_last`` and the best; returns what was removed."""
    found = list_checkpoints(run_dir)
    keep = {step for step, _ in found[-keep_last:]}
    if best_step is not None:
        keep.add(best_step)
    removed = []
    for step, folder in found:
        if step not in keep:
            _discard(folder)
            removed.append(folder)
    return removed
