"""Checkpoint files: one atomic writer, safe loading, and state-dict helpers.

Shared by every layer that writes or reads weights (the classification
trainer, the model zoo's teacher loading, the detection frontend).

* :func:`atomic_save`: ``torch.save`` to a temporary file in the target's
  directory (``.<name>.tmp<pid>``), ``fsync``, then ``os.replace``; readers see
  the old file or the new one, never a partial one. Files get mode ``0666 &
  ~umask`` (0644 under the usual umask), like any file ``open`` creates.
* :func:`load_checkpoint`: ``torch.load(weights_only=True)``. Checkpoints that
  store numpy scalars (older releases record accuracies that way) are read by
  allowing numpy's scalar and dtype reconstructors only, still under
  ``weights_only``. A file that needs any other Python object is refused with a
  message, never unpickled.
* state dicts: DataParallel's ``module.`` prefix, the student part of a
  distiller's state, strict loading with one-line errors.
"""
from __future__ import annotations

import glob
import hashlib
import os
import pickle
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "atomic_save",
    "atomic_write_text",
    "remove_stale_temp_files",
    "file_sha256",
    "load_checkpoint",
    "strip_prefix",
    "add_prefix",
    "model_state_from_checkpoint",
    "load_model_state",
    "load_weights_file",
    "DP_PREFIX",
]

DP_PREFIX = "module."
_TMP_MARK = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked (one-line message)."""


# ----------------------------------------------------------------------------- I/O
def _temp_path(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}{_TMP_MARK}{os.getpid()}")


def _atomic_write(path: str, write) -> str:
    """Call ``write(binary file)`` on a temporary file next to ``path``, fsync it, then rename it over ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = _temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_save(obj, path: str) -> str:
    """``torch.save(obj, path)`` atomically (see the module docstring). Returns ``path``."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> str:
    """Write a text file atomically, like :func:`atomic_save`."""
    return _atomic_write(path, lambda f: f.write(text.encode()))


_SHA_CACHE: Dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes (cached per path, size and modification time: teachers are large)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def remove_stale_temp_files(directory: str) -> List[str]:
    """Delete the temporary files that killed :func:`atomic_save` calls left in ``directory``."""
    removed = []
    for p in glob.glob(os.path.join(glob.escape(directory), f".*{_TMP_MARK}*")):
        tail = p.rsplit(_TMP_MARK, 1)[-1]
        if tail.isdigit() and os.path.isfile(p):
            os.remove(p)
            removed.append(p)
    return removed


def _numpy_safe_globals():
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
    return [scalar, np.dtype, *dtypes]


def _check_format(path: str) -> None:
    """A torch checkpoint is a zip archive (torch >= 1.6) or a pickle (older files, protocol 2+)."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or type(e).__name__})") from None
    if not head:
        raise CheckpointError(f"{path} is empty, not a torch checkpoint")
    if head[:1] != b"\x80" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a readable torch checkpoint (neither a zip archive nor a pickle; "
                              "a text file, or a file cut before its end?)")


def load_checkpoint(path: str, map_location="cpu", hint: str = ""):
    """Load a checkpoint with ``weights_only=True`` (see module docstring).

    A missing file raises ``FileNotFoundError`` naming it (and ``hint``: how to get it).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}" + (f"; {hint}" if hint else ""))
    _check_format(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as first:
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            reason = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
            raise CheckpointError(
                f"{path} holds Python objects that weights_only loading refuses ({reason}); "
                "re-save it as a dict of tensors, e.g. {'model': model.state_dict()}"
            ) from None
    except PermissionError:
        raise CheckpointError(f"{path} cannot be read (permission denied)") from None
    except (RuntimeError, EOFError, KeyError, OSError, ValueError, AttributeError, IndexError) as e:
        # Truncated zip archives end in OSError/RuntimeError, text files in KeyError or UnpicklingError.
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated, or not a checkpoint: "
                              f"{type(e).__name__} {msg})") from None


# ----------------------------------------------------------------------------- state dicts
def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = DP_PREFIX) -> Dict[str, torch.Tensor]:
    """Drop ``prefix`` when every key has it (DataParallel/DDP checkpoints); otherwise return a copy."""
    keys = list(state)
    if keys and all(k.startswith(prefix) for k in keys):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def add_prefix(state: Mapping[str, torch.Tensor], prefix: str = DP_PREFIX) -> Dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def model_state_from_checkpoint(ckpt) -> Dict[str, torch.Tensor]:
    """The model weights in a checkpoint: mdistiller's ``{"model": ...}``, a bare state dict,
    or a full distiller state, from which the ``student.`` part is taken."""
    state = ckpt.get("model", ckpt) if isinstance(ckpt, Mapping) else ckpt
    if not isinstance(state, Mapping):
        raise CheckpointError(f"expected a state dict, found {type(state).__name__}")
    state = strip_prefix(state)
    if any(k.startswith("student.") for k in state) and any(k.startswith("teacher.") for k in state):
        state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    return state


def _classifier_key(model: nn.Module) -> Optional[str]:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return f"{last}.weight" if last is not None else None


def _few(keys, n: int = 4) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, what: str = "model") -> None:
    """``model.load_state_dict(state, strict=True)`` with one-line errors.

    Names the missing and unexpected keys, and says so plainly when the
    classifier's class count differs from the model's.
    """
    own = model.state_dict()
    cls_key = _classifier_key(model)
    if cls_key and cls_key in state and cls_key in own and state[cls_key].shape[0] != own[cls_key].shape[0]:
        raise CheckpointError(
            f"{source} has {state[cls_key].shape[0]} classes but the {what} needs {own[cls_key].shape[0]} "
            f"({cls_key} {tuple(state[cls_key].shape)} vs {tuple(own[cls_key].shape)}): it was trained on another dataset"
        )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        raise CheckpointError(f"{source} does not fit the {what} {type(model).__name__}: {'; '.join(parts)}")
    bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{source} does not fit the {what} {type(model).__name__}: {k} has shape {tuple(state[k].shape)} "
            f"in the checkpoint, {tuple(own[k].shape)} in the model ({len(bad)} mismatched tensors)"
        )
    model.load_state_dict(state, strict=True)


def load_weights_file(model: nn.Module, path: str, what: str = "model", hint: str = "") -> nn.Module:
    """Load the weights stored at ``path`` (any layout of :func:`model_state_from_checkpoint`) into ``model``."""
    ckpt = load_checkpoint(path, hint=hint)
    try:
        state = model_state_from_checkpoint(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    load_model_state(model, state, path, what)
    return model
