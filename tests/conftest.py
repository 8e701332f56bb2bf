"""Shared fixtures: a small simulated 3D-Speaker corpus, prepared once per test session."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from local.prepare_3dspeaker import prepare_3dspeaker
from local.simulate_mini_corpus import SimulationConfig, simulate_corpus

# Small enough to build in a few seconds, big enough for trials of every kind.
MINI_CONFIG = SimulationConfig(
    num_train_speakers=12,
    num_test_speakers=6,
    utts_per_speaker=8,
    min_seconds=2.0,
    max_seconds=4.5,
    num_noises=5,
    num_rirs=4,
    seed=7,
)


@dataclass(frozen=True)
class MiniData:
    """Paths of the simulated corpus and of its prepared lists (names other tests rely on)."""

    root: Path  # corpus root: train/, test/, files/
    data_root: Path  # prepared data: 3dspeaker/, musan/, rirs/
    train_dir: Path  # Kaldi dir: wav.scp, utt2spk, spk2utt, utt2info
    test_dir: Path
    trials_dir: Path  # trials_cross_device, trials_cross_distance, trials_cross_dialect
    noise_list: Path  # data_root/musan/wav.scp
    rir_list: Path  # data_root/rirs/wav.scp
    musan_dir: Path  # raw MUSAN-like and RIRS_NOISES-like sets
    rirs_dir: Path
    config: SimulationConfig


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's small models on one thread: on a shared 2-core machine, intra-op threads
    oversubscribe the CPU and make each tiny forward pass ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory: pytest.TempPathFactory) -> MiniData:
    """Simulate a small corpus and prepare it exactly as the recipe prepares the real one."""
    base = tmp_path_factory.mktemp("mini_corpus")
    corpus = simulate_corpus(base / "raw", MINI_CONFIG, num_workers=1)
    data_root = base / "data"
    prepare_3dspeaker(corpus.corpus_dir, data_root, corpus.musan_dir, corpus.rirs_dir)
    prepared = data_root / "3dspeaker"
    return MiniData(
        root=corpus.corpus_dir,
        data_root=data_root,
        train_dir=prepared / "train",
        test_dir=prepared / "test",
        trials_dir=prepared / "trials",
        noise_list=data_root / "musan" / "wav.scp",
        rir_list=data_root / "rirs" / "wav.scp",
        musan_dir=corpus.musan_dir,
        rirs_dir=corpus.rirs_dir,
        config=MINI_CONFIG,
    )


# Parity tests against torchaudio (marked ``oracle``) run only where it is installed: the package
# itself does not need it, and CI runs the suite without it, then installs it for `-m oracle`.
HAVE_TORCHAUDIO = importlib.util.find_spec("torchaudio") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_TORCHAUDIO:
        return
    skip = pytest.mark.skip(
        reason="oracle test: torchaudio is not installed (pip install torchaudio==<torch version>)"
    )
    for item in items:
        if "oracle" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torchaudio():
    """The torchaudio module, for tests marked ``oracle`` (skipped without it)."""
    return pytest.importorskip("torchaudio")
