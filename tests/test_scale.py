"""The data stages at scale (issue 13): the index's packed in-memory form, memory that does not
grow with the corpus, and the scale benchmark's corpus generator."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from local.prepare_3dspeaker import prepare_3dspeaker
from speakerlab.data.dataset import init_data_worker
from speakerlab.data.index import (
    INDEX_MAGIC,
    PackedStrings,
    build_train_index,
    load_train_index,
)
from speakerlab.data.kaldi_dir import read_table, write_table
from tests.processes import run_bounded

REPO = Path(__file__).resolve().parents[1]
SR = 16000
sys.path.insert(0, str(REPO / "benchmarks"))
from scale_corpus import CorpusPlan, generate_corpus  # noqa: E402


def test_packed_strings_behave_like_a_list_of_strings():
    strings = ["", "a", "spk 01/ä.wav", "日本語", "x" * 1000, ""]
    packed = PackedStrings.from_strings(strings)
    assert len(packed) == len(strings) and list(packed) == strings
    assert [packed[i] for i in range(-len(strings), 0)] == strings
    assert packed.index("日本語") == 3 and packed.count("") == 2 and "a" in packed
    with pytest.raises(IndexError):
        packed[len(strings)]
    assert list(PackedStrings.from_strings([])) == []


def test_the_index_round_trips_exactly(tmp_path):
    """Every row of the loaded index has the utterance, path, length and speaker that the
    lists and the audio say, on a corpus with odd names and lengths."""
    rng = np.random.default_rng(0)
    lengths = [1, 23_999, 24_000, 24_001, 47_999, 48_000, 100_000] + list(
        rng.integers(1, 200_000, size=25)
    )
    speakers = ["spk_b", "spk_a", "spk_ü", "spk_10", "spk_9"]
    wav_scp, utt2spk, expected = [], [], []
    for number, length in enumerate(lengths):
        utt = f"utt{number:03d}_é"
        path = tmp_path / "audio dir" / f"{utt} file.wav"
        path.parent.mkdir(exist_ok=True)
        soundfile.write(path, rng.standard_normal(int(length)) * 0.1, SR, subtype="PCM_16")
        speaker = speakers[number % len(speakers)]
        wav_scp.append((utt, str(path)))
        utt2spk.append((utt, speaker))
        # 1.5 s rows: an utterance of n samples makes max(1, n // 24000) of them, in list order.
        expected += [(utt, str(path), int(length), speaker)] * max(1, int(length) // 24_000)
    write_table(tmp_path / "train" / "wav.scp", wav_scp[::-1])  # not sorted: the order is kept
    write_table(tmp_path / "train" / "utt2spk", utt2spk)
    expected = [row for utt, _ in wav_scp[::-1] for row in expected if row[0] == utt]
    index = load_train_index(
        build_train_index(tmp_path / "train", tmp_path / "index.tsv", segment_seconds=1.5)
    )
    got = [
        (
            index.utts[r],
            index.paths[r],
            int(index.num_samples[r]),
            index.speakers[index.speaker_ids[r]],
        )
        for r in range(len(index))
    ]
    assert got == expected
    assert index.speakers == sorted(speakers) and index.num_utterances == len(lengths)


def write_index(path: Path, rows: int, utterances: int, speakers: int = 1000) -> Path:
    """An index file of ``rows`` rows (without audio: for what reads only the index)."""
    samples = rows // utterances * 4 * SR  # 4 s rows: each utterance gets rows // utterances
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{INDEX_MAGIC} segment_seconds=4.0\n")
        for u in range(utterances):
            spk = f"3D_SPK_{u % speakers:05d}"
            f.write(
                f"{spk}_{u:07d}_Device01\t/corpus/train/{spk}/{spk}_{u:07d}.wav\t{samples}\t{spk}\n"
            )
    return path


def test_loading_the_index_makes_no_object_per_row(tmp_path):
    """Guards the fix of issue 13: an index held as Python strings has a few objects per row,
    whose reference counts make forked DataLoader workers copy their memory."""
    path = write_index(tmp_path / "index.tsv", rows=40_000, utterances=20_000)
    before = sys.getallocatedblocks()
    index = load_train_index(path)
    assert len(index) == 40_000 and index.num_speakers == 1000
    assert sys.getallocatedblocks() - before < 2_000  # the speaker names, not the rows


class IndexReader(Dataset):
    """Reads what a training item reads of the index, a batch of rows at a time; returns the
    worker's private memory before its first batch and after this one."""

    def __init__(self, index) -> None:
        self.index = index
        self.first: float | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows: list[int]) -> tuple[float, float]:
        if self.first is None:
            self.first = private_mb()
        index = self.index
        for row in rows:
            len(index.paths[row]) + len(index.utts[row]) + int(index.num_samples[row])
        return self.first, private_mb()


def private_mb() -> float:
    with open("/proc/self/smaps_rollup", encoding="ascii") as f:
        fields = dict(line.split()[:2] for line in f if line.endswith("kB\n"))
    return (int(fields["Private_Clean:"]) + int(fields["Private_Dirty:"])) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux only")
def test_workers_do_not_copy_the_index(tmp_path):
    """A pass over 400,000 rows leaves each worker's private memory where it started (the
    index as lists of strings grew it by 74 MB here)."""
    index = load_train_index(write_index(tmp_path / "index.tsv", rows=400_000, utterances=400_000))
    batches = BatchSampler(RandomSampler(range(len(index))), batch_size=1000, drop_last=False)
    loader = DataLoader(
        IndexReader(index),
        batch_size=None,
        sampler=batches,
        num_workers=2,
        worker_init_fn=init_data_worker,  # as in training: no collection copies torch's objects
    )
    growth = max(last - first for first, last in loader)
    assert growth < 10


class Collector(Dataset):
    """Runs a full garbage collection in the worker; returns its private memory around it."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> tuple[float, float]:
        before = private_mb()
        gc.collect()
        return before, private_mb()


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux only")
def test_a_collection_in_a_worker_copies_nothing():
    """Guards against: a worker's private memory jumping by tens of MB in the middle of an epoch
    when its garbage collector visits (and so writes to) every object inherited from the
    training process."""
    import torch  # noqa: F401  # the objects a training process holds

    loader = DataLoader(
        Collector(), batch_size=None, num_workers=1, worker_init_fn=init_data_worker
    )
    (before, after), *_ = list(loader)
    assert after - before < 5


def test_listing_and_indexing_do_not_load_torch():
    """Stage 1 and 2 stay small: importing torch alone takes hundreds of MB."""
    code = (
        "import sys, local.prepare_3dspeaker, speakerlab.bin.make_index; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchaudio')))"
    )
    result = run_bounded([sys.executable, "-c", code], timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_scale_corpus_is_prepared_and_indexed(tmp_path):
    """The benchmark's generator writes the layout that preparation reads."""
    plan = CorpusPlan.at(0.0002)
    corpus = generate_corpus(tmp_path / "raw", plan, num_workers=2)
    summary = prepare_3dspeaker(corpus, tmp_path / "data")
    total = plan.train_speakers * plan.recordings_per_speaker
    assert summary["train"].num_speakers == plan.train_speakers
    assert summary["train"].num_utts + summary["train"].num_device09 == total
    assert summary["trials"] == dict.fromkeys(summary["trials"], plan.trials_per_list)
    train = tmp_path / "data" / "3dspeaker" / "train"
    index = load_train_index(build_train_index(train, tmp_path / "index.tsv"))
    assert len(index) == summary["train"].num_utts  # files of 0.5-2 s: one row each
    lengths = [soundfile.info(p).frames for p in read_table(train / "wav.scp").values()]
    assert SR // 2 <= min(lengths) and max(lengths) <= 2 * SR
    assert generate_corpus(tmp_path / "raw", plan) == corpus  # complete: reused as it is
