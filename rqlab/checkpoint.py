"""Checkpoints: atomic save, validated load, and rebuilding a model from a file.

A checkpoint is a dict of JSON-like values and tensors (so `torch.load(weights_only=True)`
reads it without running pickled code), tagged with `format` and `version`:

    {"format": "rqlab-checkpoint", "version": 1, "rqlab_version": "...",
     "model": ModelConfig.to_dict(), "state_dict": {...}, "policy": Policy.to_dict(), ...}

    >>> save("runs/x/checkpoint.pt", {"model": model.config.to_dict(), "state_dict": model.state_dict()})
    >>> sha256("runs/x/checkpoint.pt")                    # for result records
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch

from .validate import RqlabError

FORMAT = "rqlab-checkpoint"
VERSION = 1


def rqlab_version() -> str:
    """The installed rqlab version, or "unknown" when running from a bare source tree."""
    try:
        from . import __version__  # type: ignore[attr-defined]
        return str(__version__)
    except ImportError:
        pass
    try:
        from importlib.metadata import version
        return version("rqlab")
    except Exception:  # not installed
        return "unknown"


def atomic_write(path, write) -> Path:
    """Call `write(file_object)` on a temp file next to `path`, fsync, then os.replace.

    Readers see the old file or the complete new one, never a partial one; on any error
    (KeyboardInterrupt included) the temp file is removed and the old file is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600 files; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (POSIX; a no-op elsewhere)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def temp_prefix(name: str) -> str:
    """The hidden temp-file prefix of rqlab's atomic writes: `.NAME.PID.` (the writer's pid
    tells `sweep_temp` whether the file is still being written)."""
    return f".{name}.{os.getpid()}."


_TEMP = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.(tmp|ipynb)$")


def sweep_temp(folder) -> list[Path]:
    """Remove the temp files that killed rqlab writers left in `folder` (not recursive).

    Only files of rqlab's own naming (`.NAME.PID.XXXXXXXX.tmp` from `atomic_write`,
    `.STEM.PID.XXXXXXXX.ipynb` from the report's notebook runs) whose writer process is
    gone are removed; returns them.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        m = _TEMP.match(path.name)
        if m is None or not path.is_file() or _alive(int(m.group(1))):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def check_output_dir(path, field: str) -> Path:
    """A folder that `field` will write into: it exists as a folder, or can be created.

    Nothing is created; raises RqlabError naming `field`, the path and the fix (an existing
    file in the way, a parent that is a file, a place where no file can be written).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RqlabError(f"{field}={str(path)!r} is an existing file, not a folder: give a folder path "
                         "(or move the file away)")
    _check_creatable(path if path.is_dir() else path.parent, path, field)
    return path


def check_output_file(path, field: str) -> Path:
    """A file that `field` will write (atomically): not a folder, in a folder that exists or
    can be created and is writable. Nothing is created; RqlabError otherwise."""
    path = Path(path)
    if path.is_dir():
        raise RqlabError(f"{field}={str(path)!r} is a folder: give a file path such as "
                         f"{str(path / 'record.json')!r}")
    _check_creatable(path.parent, path, field)
    return path


def _check_creatable(folder: Path, target: Path, field: str) -> None:
    existing = folder.absolute()
    while not existing.exists():  # the nearest existing ancestor must be a writable folder
        existing = existing.parent
    if not existing.is_dir():
        raise RqlabError(f"{field}={str(target)!r} cannot be created: {existing} is a file, not a folder; "
                         "choose another path")
    try:  # os.access says yes to root on read-only mounts: try a real file
        fd, probe = tempfile.mkstemp(prefix=temp_prefix("probe"), suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RqlabError(f"{field}={str(target)!r} cannot be written: {existing} is not writable "
                         f"({e.strerror}); choose another path") from None


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file (0666 less the umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save(path, payload: dict) -> Path:
    """Write `payload` (JSON-like values and tensors) atomically, tagged as a checkpoint."""
    if not isinstance(payload, dict):
        raise RqlabError(f"checkpoint payload must be a dict, got {type(payload).__name__}")
    payload = {"format": FORMAT, "version": VERSION, "rqlab_version": rqlab_version(), **payload}
    return atomic_write(path, lambda f: torch.save(payload, f))


def _to_dict(obj):
    """JSON for rqlab's own value types (records, specs, policies): their to_dict()."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_json(path, obj) -> Path:
    """Write `obj` as indented JSON, atomically (e.g. a run's history.json); records,
    specs and policies inside it are written as their to_dict()."""
    text = json.dumps(obj, indent=2, default=_to_dict) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically (e.g. a report's HTML page or PNG figure)."""
    return atomic_write(path, lambda f: f.write(data))


def load(path, map_location="cpu") -> dict:
    """Read a checkpoint written by `save` (weights_only: no code runs on load).

    Raises RqlabError, naming the file, when it is missing, truncated or corrupt, or not
    an rqlab checkpoint of a version this rqlab reads.
    """
    path = Path(path)
    if not path.is_file():
        raise RqlabError(f"checkpoint {path} does not exist: check the path, or train a model first "
                         "(rqlab train ... --out DIR writes DIR/checkpoint.pt)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError,
            OSError) as e:
        raise RqlabError(
            f"checkpoint {path} could not be read ({_first_line(e)}): "
            "the file is truncated, corrupt or not a torch file; retrain or restore it from a copy "
            "(rqlab writes checkpoints atomically, so an interrupted save leaves the previous one)") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RqlabError(f"{path} is not an rqlab checkpoint (no format={FORMAT!r} tag): "
                         "load it with torch.load, or convert the model with rqlab.quant.convert")
    if payload.get("version") != VERSION:
        raise RqlabError(f"checkpoint {path} has version {payload.get('version')!r}, but this rqlab "
                         f"({rqlab_version()}) reads version {VERSION}: use the rqlab that wrote it")
    return payload


def _first_line(e: BaseException, limit: int = 300) -> str:
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:limit] if lines else ''}"


def policy_state(policy):
    """The policy's own RNG state (RandomPrecision), else None. Checkpoint-safe (tuples of ints)."""
    return policy.get_state() if hasattr(policy, "get_state") else None


def sha256(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (recorded with results to pin the exact weights)."""
    path = Path(path)
    if not path.is_file():
        raise RqlabError(f"{path} does not exist: cannot hash it")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
