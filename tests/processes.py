"""Subprocesses of the tests that cannot outlive them."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest


def kill_session(session: int) -> None:
    """SIGKILL whatever is left of the process session ``session``."""
    try:
        os.killpg(session, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_bounded(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)`` in a session of its own; if it
    runs over ``timeout`` seconds the whole session (torchrun's workers, a recipe's children) is
    killed and the test fails, so that no process is left behind to hold up the test run."""
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(process.pid)
            stdout, stderr = process.communicate()
            pytest.fail(
                f"{' '.join(command)} ran over {timeout} s and was killed; its stderr "
                f"ended:\n{stderr[-3000:]}"
            )
        finally:
            kill_session(process.pid)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
