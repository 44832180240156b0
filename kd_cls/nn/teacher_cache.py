"""An exact cache of a frozen teacher's logits, per (sample, view).

A teacher never changes and a finite augmentation gives each image a finite set
of views (CIFAR: 9 x 9 crop offsets x 2 flips = 162), so the logits of a
(sample, view) pair never change either: computing them once is enough.

One file per key, ``<folder>/teacher-<digest>.kdcache``, where the key is the
teacher's weights (sha256 of its state dict), the dataset (name, size, sha256
of its images and labels), the transform settings and the precision:

* bytes ``[0, 4096)``: a header, ``MAGIC`` then the key as JSON;
* ``rows`` flag bytes (``rows = samples x views``), 1 once a row is written;
* ``rows x classes`` float32 logits, row ``sample * views + view``.

A row is written, made durable (``fdatasync``), and only then flagged, so no
reader ever takes a half-written row for a written one, whether the writer was
killed or the machine lost power. Syncing costs tens of milliseconds, so rows
are committed (synced, then flagged) in groups, every ``sync_every`` seconds
and on :meth:`~TeacherLogitCache.close`; until then the writing process reads
its own rows and others see misses (a kill loses those rows, never corrupts
one). The file's space is reserved when it is made (``posix_fallocate``): a
full disk would otherwise kill a writer with SIGBUS.
"""
from __future__ import annotations

import atexit
import errno
import glob
import hashlib
import json
import mmap
import os
import shutil
import socket
import tempfile
import time
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["TeacherLogitCache", "TeacherCacheError", "state_sha256", "arrays_sha256", "cache_path",
           "cache_bytes", "key_differences", "human_bytes", "FORMAT"]

MAGIC = b"KD-TEACHER-LOGITS\n"
FORMAT = 1
HEADER = 4096
SUFFIX = ".kdcache"


class TeacherCacheError(ValueError):
    """A teacher cache that cannot be used as asked (one-line message)."""


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    # Raw bytes whatever the dtype (numpy has no bfloat16).
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def state_sha256(state: Dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict: each entry's name, dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def arrays_sha256(*arrays) -> str:
    """sha256 of tensors or arrays: their dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        t = a if torch.is_tensor(a) else torch.from_numpy(np.ascontiguousarray(a))
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _layout(rows: int, classes: int) -> Tuple[int, int, int]:
    """``(flags offset, logits offset, file size)``; sections start on page boundaries."""
    page = mmap.ALLOCATIONGRANULARITY
    flags_at = HEADER
    logits_at = flags_at + -(-rows // page) * page
    return flags_at, logits_at, logits_at + rows * classes * 4


def cache_bytes(samples: int, views: int, classes: int) -> int:
    """Size of the cache file of ``samples x views`` rows of ``classes`` float32 logits."""
    return _layout(samples * views, classes)[2]


def cache_path(folder: str, key: Dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(folder, f"teacher-{digest}{SUFFIX}")


def key_differences(a: Dict, b: Dict, prefix: str = "") -> List[str]:
    """Dotted names of the entries where two keys differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += key_differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _read_header(path: str) -> Optional[Dict]:
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER)
        if not head.startswith(MAGIC):
            return None
        return json.loads(head[len(MAGIC):].rstrip(b"\0 ").decode())
    except (OSError, ValueError):
        return None


def human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _first_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def _temp_name(path: str, pid: Optional[int] = None) -> str:
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid() if pid is None else pid}"


def _remove_stale_temps(path: str) -> None:
    """Temporary files of ``path`` left by a creator on this machine that was killed (its process is gone)."""
    for p in glob.glob(glob.escape(_temp_name(path, 0))[:-1] + "*"):
        pid = p.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            os.remove(p)
        except OSError:
            pass


class TeacherLogitCache:
    """The memory-mapped cache file of one key (see the module docstring); use :meth:`open`."""

    def __init__(self, path: str, key: Dict, samples: int, views: int, classes: int, sync_every: float = 5.0):
        self.path, self.key = path, key
        self.sync_every = float(sync_every)
        self.samples, self.views, self.classes = int(samples), int(views), int(classes)
        self.rows = self.samples * self.views
        flags_at, logits_at, self.size = _layout(self.rows, self.classes)
        self._fd = os.open(path, os.O_RDWR)
        self._mm = mmap.mmap(self._fd, self.size)
        self._flags = np.frombuffer(self._mm, np.uint8, self.rows, flags_at)
        self._logits = np.frombuffer(self._mm, np.float32, self.rows * self.classes, logits_at).reshape(
            self.rows, self.classes)
        self._pending: List[np.ndarray] = []
        self._mine: Optional[np.ndarray] = None  # rows written here and not yet committed
        self._last_sync = time.monotonic()
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, folder: str, key: Dict, samples: int, views: int, classes: int, create: bool = True,
             log: Callable[[str], None] = print, what: str = "SOLVER.TEACHER_CACHE",
             sync_every: float = 5.0) -> "TeacherLogitCache":
        """The cache of ``key`` in ``folder``, made (``create``) when there is none.

        ``folder`` may instead name one cache file (``*.kdcache``), which must then hold this key.

        Every check (a folder that is a file or not writable, a file of another
        key, too little free space) raises a one-line :class:`TeacherCacheError`
        before anything is written.
        """
        target = os.path.abspath(os.path.expanduser(folder))
        named = target.endswith(SUFFIX)  # one named cache file rather than a folder of them
        folder, path = (os.path.dirname(target), target) if named else (target, cache_path(target, key))
        size = cache_bytes(samples, views, classes)
        if not named and os.path.exists(folder) and not os.path.isdir(folder):
            raise TeacherCacheError(f"{what}: {folder} is a file, not a folder; give a folder for teacher caches")
        if os.path.isfile(path):
            cls._check_existing(path, key, size, what)
            return cls(path, key, samples, views, classes, sync_every)
        if not create:
            raise TeacherCacheError(f"{what}: {path} does not exist; the process that makes it did not")
        _remove_stale_temps(path)  # before the space check: a killed creator's file holds space
        cls._check_can_create(folder, size, samples, views, classes, what)
        why = ""
        for p in sorted(glob.glob(os.path.join(glob.escape(folder), "*" + SUFFIX))):
            head = _read_header(p)
            if head is not None:
                diff = key_differences(head.get("key", {}), key)
                why = f"; {os.path.basename(p)} is of another key (differs in {', '.join(diff)}), so it is not read"
                break
        log(f"teacher cache: making {path} ({human_bytes(size)}: {samples} samples x {views} views x {classes} "
            f"float32 logits){why}")
        cls._create(path, key, size)
        return cls(path, key, samples, views, classes, sync_every)

    @staticmethod
    def _check_existing(path: str, key: Dict, size: int, what: str) -> None:
        head = _read_header(path)
        if head is None:
            raise TeacherCacheError(f"{what}: {path} is not a teacher cache file (no header); remove it")
        if head.get("key") != key:
            diff = key_differences(head.get("key", {}), key)
            raise TeacherCacheError(f"{what}: {path} holds the cache of another key (differs in "
                                    f"{', '.join(diff) or 'its layout'}) and is never read; remove it")
        actual = os.path.getsize(path)
        if actual != size:
            raise TeacherCacheError(f"{what}: {path} has {actual} bytes, but its key needs {size}; "
                                    "it was cut short: remove it")

    @staticmethod
    def _check_can_create(folder: str, size: int, samples: int, views: int, classes: int, what: str) -> None:
        existing = _first_existing(folder)
        if not os.path.isdir(existing):
            raise TeacherCacheError(f"{what}: cannot create {folder}: {existing} is a file, not a folder")
        try:  # a real probe: os.access says yes to root even where the file system refuses
            os.rmdir(tempfile.mkdtemp(prefix=".kd-probe-", dir=existing))
        except OSError as e:
            raise TeacherCacheError(f"{what}: cannot write in {existing} ({e.strerror or type(e).__name__}); "
                                    "choose a writable folder") from None
        free = shutil.disk_usage(existing).free
        if free < size:
            raise TeacherCacheError(
                f"{what}: the cache needs {human_bytes(size)} ({samples} samples x {views} views x {classes} classes "
                f"x 4 B, plus flags) but {existing} has {human_bytes(free)} free; free space or choose another folder")

    @staticmethod
    def _create(path: str, key: Dict, size: int) -> None:
        header = MAGIC + json.dumps({"format": FORMAT, "key": key}, sort_keys=True).encode()
        if len(header) > HEADER:
            raise TeacherCacheError(f"teacher cache key too long for the header ({len(header)} > {HEADER} bytes)")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _temp_name(path)
        # Made under a temporary name, then linked: a reader sees no file or a complete one.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, header.ljust(HEADER, b"\0"))
            if hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    if e.errno == errno.ENOSPC:  # taken since the space check
                        raise TeacherCacheError(f"no space left for the {human_bytes(size)} of {path}") from None
                    os.ftruncate(fd, size)  # a file system without fallocate: a sparse file then
            else:
                os.ftruncate(fd, size)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.remove(tmp)
            raise
        os.close(fd)
        try:  # link, not rename: when two runs make the same cache at once, the first one's file stays
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    # ------------------------------------------------------------------ rows
    def row_ids(self, index, view) -> np.ndarray:
        i = np.asarray(index.detach().cpu() if torch.is_tensor(index) else index, dtype=np.int64).reshape(-1)
        v = np.asarray(view.detach().cpu() if torch.is_tensor(view) else view, dtype=np.int64).reshape(-1)
        if i.shape != v.shape:
            raise ValueError(f"index and view differ in length ({i.size} vs {v.size})")
        if i.size and (i.min() < 0 or i.max() >= self.samples or v.min() < 0 or v.max() >= self.views):
            raise ValueError(f"(index, view) outside this cache's {self.samples} samples x {self.views} views")
        return i * self.views + v

    def lookup(self, index, view) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(hits (B,) bool, logits (B, classes) float32)`` on the CPU; rows of misses are zeros."""
        rows = self.row_ids(index, view)
        hits = self._flags[rows] == 1  # flags first: a row is complete before its flag is set
        if self._mine is not None:
            hits |= self._mine[rows]
        out = np.zeros((rows.size, self.classes), np.float32)
        out[hits] = self._logits[rows[hits]]
        return torch.from_numpy(hits), torch.from_numpy(out)

    def store(self, index, view, logits: torch.Tensor) -> None:
        """Write the logits of ``(index, view)`` pairs, then flag them."""
        self.store_rows(self.row_ids(index, view), logits)

    def store_rows(self, rows: np.ndarray, logits: torch.Tensor) -> None:
        values = logits.detach().float().cpu().numpy()
        if values.shape != (len(rows), self.classes):
            raise ValueError(f"expected ({len(rows)}, {self.classes}) logits, got {tuple(values.shape)}")
        self._logits[rows] = values
        if self._mine is None:
            self._mine = np.zeros(self.rows, bool)
        self._mine[rows] = True
        self._pending.append(np.asarray(rows, np.int64))
        if time.monotonic() - self._last_sync >= self.sync_every:
            self.commit()

    def commit(self) -> None:
        """Make the rows written so far durable, then flag them (for every process)."""
        self._last_sync = time.monotonic()
        if not self._pending:
            return
        rows = np.concatenate(self._pending)
        os.fdatasync(self._fd)  # the rows reach the disk before any flag can say they are there
        self._flags[rows] = 1
        self._mine[rows] = False
        self._pending = []

    def forget(self, index, view) -> None:
        """Unflag ``(index, view)`` pairs: they read as misses again (a benchmark's cold steps)."""
        rows = self.row_ids(index, view)
        self._flags[rows] = 0
        if self._mine is not None:
            self._mine[rows] = False

    def filled(self) -> np.ndarray:
        """Bool mask of the rows written (committed, or written by this process)."""
        mask = self._flags == 1
        return mask | self._mine if self._mine is not None else mask

    def close(self) -> None:
        if self._mm is None:
            return
        self.commit()
        self._flags = self._logits = self._mine = None  # the buffer cannot close while arrays view it
        self._mm.flush()
        self._mm.close()
        os.close(self._fd)
        self._mm = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the os module may be gone
            pass
