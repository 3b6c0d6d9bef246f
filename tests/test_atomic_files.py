"""Atomic writes: a final name is the old complete file, a new complete one, or absent."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from engine.atomic_files import DiskFull, atomic_path, disk_full_errno, write_text


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "eval.npz"
    np.savez(path, x=np.arange(3))
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("boom")
    assert np.load(path)["x"].tolist() == [0, 1, 2]
    assert leftovers(tmp_path) == []


def test_failure_mid_write_leaves_no_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    with pytest.raises(ValueError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"x" * 100)
            raise ValueError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_complete_write_replaces_and_keeps_the_suffix(tmp_path):
    path = tmp_path / "eval.npz"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".npz" and tmp.name.startswith(".")
        np.savez(tmp, x=np.arange(4))  # numpy appends nothing to a name ending in .npz
    assert np.load(path)["x"].tolist() == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["eval.npz"]


def test_every_call_gets_its_own_temporary(tmp_path):
    path = tmp_path / "stats.npz"
    with atomic_path(path) as a, atomic_path(path) as b:
        assert a != b
        a.write_text("a")
        b.write_text("b")
    assert path.read_text() == "a"  # the outer one finished last
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exc, code", [
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (OSError(errno.EFBIG, "File too large"), errno.EFBIG),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
    (sqlite3.OperationalError("database or disk is full"), errno.ENOSPC),
    (Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
     errno.ENOSPC),
    (Exception("I/O error: File too large (os error 27)"), errno.EFBIG),
    (OSError(errno.EACCES, "Permission denied"), None),
    (ValueError("not a float16 value"), None),
])
def test_disk_full_is_recognised_in_its_many_words(exc, code):
    assert disk_full_errno(exc) == code
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = exc
    assert disk_full_errno(wrapped) == code


def test_a_full_disk_is_raised_as_diskfull_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "run-00003").mkdir(parents=True)
    path = tmp_path / "runs" / "run-00003" / "weights.safetensors"
    with pytest.raises(DiskFull) as info:
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(info.value) == "no space left on device writing runs/run-00003/weights.safetensors"
    assert not path.exists() and leftovers(path.parent) == []


FSIZE_CHILD = """
import resource, sys
import numpy as np
from safetensors.numpy import save_file
from tests.conftest import REPO
from engine.atomic_files import atomic_path
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
path = sys.argv[1]
try:
    with atomic_path(path) as tmp:
        save_file({"w": np.zeros(100_000, dtype=np.float32)}, str(tmp))
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_a_file_size_limit_mid_safetensors_write(tmp_path):
    """safetensors (Rust) writes until EFBIG: the final name never appears, nor the temporary."""
    path = tmp_path / "weights.safetensors"
    out = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.stdout.startswith("DiskFull no space left (file size limit exceeded) writing "), out.stdout + out.stderr
    assert str(path) in out.stdout or path.name in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_write_text_is_atomic(tmp_path):
    path = tmp_path / "job.json"
    write_text(path, '{"a": 1}')
    assert path.read_text() == '{"a": 1}'
    assert leftovers(tmp_path) == []

