"""Atomic writes, output locks and content digests (speakerlab/fileio.py)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from speakerlab.fileio import (
    LockedError,
    atomic_write,
    exclusive_lock,
    file_digest,
    json_digest,
    temporary_files,
    tensors_digest,
    write_text_atomic,
)


def test_a_failed_write_leaves_the_old_content_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert temporary_files(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_a_killed_writer_leaves_the_old_content(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    writer = (
        "import sys, time\n"
        "from speakerlab.fileio import atomic_write\n"
        "with atomic_write(sys.argv[1], 'wb') as f:\n"
        "    f.write(b'new' * 1000); f.flush(); print('writing', flush=True); time.sleep(60)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", writer, str(target)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert target.read_bytes() == b"old"
    assert len(temporary_files(tmp_path)) == 1  # debris only under a hidden temporary name


def test_a_second_process_is_refused_with_the_holder_named(tmp_path):
    lock = tmp_path / ".lock"
    holder = (
        "import sys, time\n"
        "from speakerlab.fileio import exclusive_lock\n"
        "with exclusive_lock(sys.argv[1], what='the folder'):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", holder, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"the folder is in use by process {process.pid}"):
            with exclusive_lock(lock, what="the folder", wait_seconds=0.3, poll_seconds=0.1):
                pass
    finally:
        process.kill()
        process.wait()
    # A killed holder releases the lock at once.
    with exclusive_lock(lock, what="the folder"):
        pass


def test_a_waiting_process_gets_the_lock_when_it_is_released(tmp_path):
    lock = tmp_path / ".lock"
    holder = (
        "import sys, time\n"
        "from speakerlab.fileio import exclusive_lock\n"
        "with exclusive_lock(sys.argv[1], what='x'):\n"
        "    print('locked', flush=True); time.sleep(1.0)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", holder, str(lock)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    start = time.monotonic()
    with exclusive_lock(lock, what="x", wait_seconds=30, poll_seconds=0.05):
        waited = time.monotonic() - start
    process.wait()
    assert 0.3 < waited < 30


def test_digests_follow_content_not_containers(tmp_path):
    weights = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(2)}
    reordered = {"b.bias": torch.ones(2), "a.weight": torch.arange(6.0).reshape(2, 3).clone()}
    assert tensors_digest(weights) == tensors_digest(reordered)
    changed = dict(weights, **{"b.bias": torch.tensor([1.0, 1.0 + 1e-6])})
    assert tensors_digest(changed) != tensors_digest(weights)
    reshaped = dict(weights, **{"a.weight": torch.arange(6.0).reshape(3, 2)})
    assert tensors_digest(reshaped) != tensors_digest(weights)
    assert tensors_digest({"x": torch.ones(3, dtype=torch.bfloat16)}) != tensors_digest(
        {"x": torch.ones(3, dtype=torch.float16)}
    )
    one, two = tmp_path / "1", tmp_path / "2"
    one.write_bytes(b"same")
    two.write_bytes(b"same")
    assert file_digest(one) == file_digest(two)
    # SHA-256 of b"same", computed independently (hashlib / sha256sum).
    assert file_digest(one) == "0967115f2813a3541eaef77de9d9d5773f1c0c04314b0bbfe4ff3b3b1c55b5d5"
    assert json_digest({"a": 1, "b": [2]}) == json_digest({"b": [2], "a": 1})
