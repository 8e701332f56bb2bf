"""The package runs without torchaudio: nothing in speakerlab imports it, the install does not
require it, and features, resampling and audio reading work with it blocked."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import tomllib
from processes import run_bounded

REPO = Path(__file__).resolve().parents[1]

BLOCKED_RUN = """
import importlib, pkgutil, sys
sys.modules["torchaudio"] = None  # any "import torchaudio" now raises ImportError
import numpy as np, soundfile, torch
import speakerlab
modules = pkgutil.walk_packages(speakerlab.__path__, "speakerlab.")
names = [m.name for m in modules if not m.name.endswith("__main__")]  # that one runs the CLI
for name in names:
    importlib.import_module(name)
from speakerlab.audio import load_audio
from speakerlab.data.speed_perturb import SpeedPerturbation
from speakerlab.features import fbank
soundfile.write(sys.argv[1], np.zeros(8000, dtype=np.float32), 8000)
wav = load_audio(sys.argv[1], resample=True)
assert wav.shape == (16000,) and fbank(wav).shape == (98, 80)
assert SpeedPerturbation((1.0, 0.9)).perturb(wav, 0.9).shape == (17778,)
print(len(names), "modules")
"""


@pytest.mark.slow  # a fresh interpreter imports torch and every module: about 5 s
def test_every_module_imports_and_runs_with_torchaudio_blocked(tmp_path):
    result = run_bounded(
        [sys.executable, "-c", BLOCKED_RUN, str(tmp_path / "tone.wav")], timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[0]) > 20  # the walk found the package's modules


def test_no_source_of_the_package_imports_torchaudio():
    """Also imports inside functions, which importing the modules does not reach."""
    offenders = []
    for source in sorted((REPO / "speakerlab").rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(name.split(".")[0] == "torchaudio" for name in names):
                offenders.append(f"{source.relative_to(REPO)}:{node.lineno}")
    assert not offenders


def test_torchaudio_is_only_an_optional_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not any(dep.startswith("torchaudio") for dep in project["dependencies"])
    assert any(dep.startswith("torchaudio") for dep in project["optional-dependencies"]["oracle"])
    torch_pins = [dep for dep in project["dependencies"] if dep.startswith("torch")]
    assert torch_pins and all(">=" in dep and "==" not in dep for dep in torch_pins)
    requirements = (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
    assert not any(line.startswith("torchaudio") for line in requirements)
