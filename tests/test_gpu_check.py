"""tools/gpu_check.sh --rehearse: the GPU check's script run on the CPU with every part shrunk,
so that the run on a GPU machine is the second run of a script that already works."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from processes import run_bounded

REPO = Path(__file__).resolve().parents[1]
PARTS = ["data", "recipe", "base_fp32", "base_bf16", "base_fp16", "synthetic", "extract", "restart"]


@pytest.mark.slow
def test_rehearsal_runs_every_part_and_reports_each_as_it_ends(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    script = REPO / "tools" / "gpu_check.sh"
    result = run_bounded(
        ["bash", str(script), "--out", str(tmp_path), "--rehearse"], timeout=1800, env=env
    )
    summary = (tmp_path / "summary.md").read_text()
    assert result.returncode == 0, summary + result.stderr[-2000:]
    status = dict(re.findall(r"^- (\w+): (ok|skipped|FAILED|TIMEOUT)", summary, re.MULTILINE))
    assert list(status) == PARTS
    assert status == {**dict.fromkeys(PARTS, "ok"), "base_fp16": "skipped"}
    # each part's result lines follow its status line
    assert re.search(r"- recipe: ok .*\n  - \| trials \|", summary)
    assert re.search(r"ERes2Net base, batch 8, fp32: [\d.]+ samples/s, data wait [\d.]+ %", summary)
    assert re.search(r"synthetic bf16: [\d.]+ samples/s on synthetic batches of 8 x ", summary)
    assert "embeddings on cpu vs CPU PyTorch (fp32): lowest cosine 1.000000" in summary
    assert re.search(r"killed after step \d+ of 10, restarted; final weights identical", summary)
    assert (tmp_path / "recipe.log").stat().st_size > 0  # one log per part
