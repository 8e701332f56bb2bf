"""Batched, resumable, sharded extraction of a wav.scp into Kaldi ark/scp."""

import json
import logging
import os
import sys

import numpy as np
import pytest
import soundfile
import torch
from processes import run_bounded

from speakerlab.embedder import Embedder, TorchEmbedder
from speakerlab.embedding_store import read_embeddings
from speakerlab.errors import AudioError
from speakerlab.extract import Utterance, extract_embeddings, make_batches
from speakerlab.features import fbank
from speakerlab.models import build_model
from speakerlab.models.checkpoint import save_embedding_model

# Lengths in samples: three of 1.0 s, two of 1.5 s (+ a few samples, same frame count), others.
LENGTHS = [16000, 24000, 16000, 24050, 19200, 16000, 12345, 40000]


def small_model(seed=0):
    torch.manual_seed(seed)
    model = build_model("eres2net", feat_dim=80, embedding_size=32, m_channels=8)
    for module in model.modules():  # non-trivial batch-norm statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def embedder():
    return TorchEmbedder(small_model())


def write_wav_scp(directory, lengths=LENGTHS, rate=16000, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, length in enumerate(lengths):
        path = directory / f"utt{i}.wav"
        t = np.arange(length) / rate
        wav = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.05 * rng.standard_normal(length)
        soundfile.write(path, wav.astype(np.float32), rate)
        lines.append(f"utt{i} {path}\n")
    scp = directory / "wav.scp"
    scp.write_text("".join(lines))
    return scp


class CountingEmbedder(Embedder):
    """Wraps an embedder, counts embedded utterances and can fail after some batches."""

    def __init__(self, inner, fail_after_batches=None):
        self.inner, self.feat_dim = inner, inner.feat_dim
        self.fail_after_batches = fail_after_batches
        self.batches, self.utterances = 0, 0

    @property
    def min_frames(self):
        return self.inner.min_frames

    @property
    def identity(self):
        return self.inner.identity

    def embed_features(self, feats):
        if self.fail_after_batches is not None and self.batches >= self.fail_after_batches:
            raise KeyboardInterrupt("simulated interruption")
        self.batches += 1
        self.utterances += feats.shape[0]
        return self.inner(feats)


def smallest_accepted_frames(model, feat_dim=80, limit=100):
    """Brute force, independent of the embedder's binary search: the shortest input (frames)
    that the model turns into a finite embedding."""
    generator = torch.Generator().manual_seed(3)
    for frames in range(1, limit):
        try:
            with torch.inference_mode():
                out = model(torch.randn(1, frames, feat_dim, generator=generator))
        except Exception:
            continue
        if torch.isfinite(out).all():
            return frames
    raise AssertionError("no accepted length")


def stored_utterances(out_dir):
    """Utterances with a complete record line in the parts (read by hand from the JSON lines)."""
    done = set()
    for record in (out_dir / "parts").glob("*.jsonl"):
        for line in record.read_text().split("\n")[1:-1]:
            done.add(json.loads(line)["utt"])
    return done


def test_batches_hold_equal_frame_counts_only():
    utts = [
        Utterance(f"u{i}", "x", 0, "", 1, frames)
        for i, frames in enumerate([98, 148, 98, 148, 118, 98, 98, 75])
    ]
    batches = make_batches(utts, batch_size=3, max_batch_frames=10_000)
    assert [[u.utt for u in b] for b in batches] == [
        ["u7"],
        ["u0", "u2", "u5"],
        ["u6"],
        ["u4"],
        ["u1", "u3"],
    ]
    # The frame budget splits a run too: 2 x 98 frames fit into 200, 3 do not.
    assert [len(b) for b in make_batches(utts, 8, 200)] == [1, 2, 2, 1, 1, 1]


def test_batched_extraction_equals_one_at_a_time(tmp_path, embedder):
    scp = write_wav_scp(tmp_path / "wavs")
    batched = CountingEmbedder(embedder)
    out = extract_embeddings(scp, batched, tmp_path / "batched", batch_size=8, progress=False)
    single = extract_embeddings(scp, embedder, tmp_path / "single", batch_size=1, progress=False)
    assert batched.batches == 5  # 1.0 s x3, 1.5 s x2, and three lone lengths

    got, ref = read_embeddings(out), read_embeddings(single)
    assert list(got) == [f"utt{i}" for i in range(len(LENGTHS))]  # wav.scp order
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], atol=1e-5)
    # ... and both equal the model applied to the utterance directly.
    wav, _ = soundfile.read(tmp_path / "wavs" / "utt3.wav", dtype="float32")
    with torch.inference_mode():
        direct = embedder.model(fbank(torch.from_numpy(wav)).unsqueeze(0))[0].numpy()
    np.testing.assert_allclose(got["utt3"], direct, atol=1e-5)
    assert not (tmp_path / "batched" / "parts").exists()  # merged and cleaned up


def test_interrupted_extraction_resumes_where_it_stopped(tmp_path, embedder):
    scp = write_wav_scp(tmp_path / "wavs")
    reference = read_embeddings(
        extract_embeddings(scp, embedder, tmp_path / "ref", batch_size=2, progress=False)
    )
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        extract_embeddings(
            scp, CountingEmbedder(embedder, fail_after_batches=3), out, batch_size=2, progress=False
        )
    done = stored_utterances(out)
    # Batches by length: [utt6] [utt0 utt2] [utt5] [utt4] [utt1 utt3] [utt7]; three were done.
    assert done == {"utt6", "utt0", "utt2", "utt5"}
    assert not (out / "embedding.scp").exists()
    # A line cut short by the interruption does not count and is dropped on restart, as is
    # an ark entry that no record line refers to.
    part = next((out / "parts").glob("part-*.jsonl"))
    with open(part, "a") as f:
        f.write('{"utt": "utt7", "path": "x", "digest": "y", "start": 99999')
    with open(part.with_suffix(".ark"), "ab") as f:
        f.write(b"utt7 \0BFV\4garbage")

    resumed = CountingEmbedder(embedder)
    scp_out = extract_embeddings(scp, resumed, out, batch_size=2, progress=False)
    assert resumed.utterances == len(LENGTHS) - len(done)
    result = read_embeddings(scp_out)
    assert list(result) == list(reference)
    for key in reference:
        np.testing.assert_allclose(result[key], reference[key], atol=1e-5)
    assert not (out / "parts").exists()  # merged and cleaned up

    # A finished extraction is not redone.
    again = CountingEmbedder(embedder)
    extract_embeddings(scp, again, out, batch_size=2, progress=False)
    assert again.utterances == 0


def test_new_utterances_extend_a_finished_extraction(tmp_path, embedder):
    scp = write_wav_scp(tmp_path / "wavs")
    out = tmp_path / "out"
    lines = scp.read_text().splitlines(keepends=True)
    first = tmp_path / "first.scp"
    first.write_text("".join(lines[:4]))
    extract_embeddings(first, embedder, out, progress=False)
    counting = CountingEmbedder(embedder)
    result = read_embeddings(extract_embeddings(scp, counting, out, progress=False))
    assert counting.utterances == len(LENGTHS) - 4
    assert list(result) == [f"utt{i}" for i in range(len(LENGTHS))]


def test_another_model_discards_the_stored_embeddings(tmp_path, embedder, caplog):
    scp = write_wav_scp(tmp_path / "wavs", lengths=[16000, 16000, 24000])
    out = tmp_path / "out"
    first = read_embeddings(extract_embeddings(scp, embedder, out, progress=False))
    other = CountingEmbedder(TorchEmbedder(small_model(seed=1)))
    with caplog.at_level(logging.INFO, logger="speakerlab.extract"):
        second = read_embeddings(extract_embeddings(scp, other, out, progress=False))
    assert "model changed: discarding 3 embeddings" in caplog.text
    assert other.utterances == 3
    expected = read_embeddings(
        extract_embeddings(
            scp, TorchEmbedder(small_model(seed=1)), tmp_path / "fresh", progress=False
        )
    )
    for key in first:
        assert not np.allclose(second[key], first[key], atol=1e-3)
        np.testing.assert_allclose(second[key], expected[key], atol=1e-6)


def test_unusable_recordings_are_listed_before_any_work(tmp_path, embedder):
    scp = write_wav_scp(tmp_path / "wavs", lengths=[16000, 16000])
    soundfile.write(tmp_path / "wavs" / "low_rate.wav", np.zeros(8000, np.float32), 8000)
    soundfile.write(tmp_path / "wavs" / "short.wav", np.zeros(640, np.float32), 16000)
    (tmp_path / "wavs" / "broken.wav").write_bytes(b"not audio at all")
    with open(scp, "a") as f:
        for name in ("low_rate", "short", "broken"):
            f.write(f"{name} {tmp_path / 'wavs' / name}.wav\n")
    counting = CountingEmbedder(embedder)
    with pytest.raises(AudioError) as error:
        extract_embeddings(scp, counting, tmp_path / "out", progress=False)
    message = str(error.value)
    assert "3 unusable recording(s)" in message
    assert "low_rate.wav: sample rate is 8000 Hz, expected 16000 Hz" in message
    # 640 samples give 1 + (640 - 400) // 160 = 2 frames. ERes2Net halves the time axis three
    # times (ceil each time) and its statistics pooling needs 2 frames for a standard deviation:
    # ceil(ceil(ceil(n / 2) / 2) / 2) >= 2 first holds for n = 9. The brute-force scan agrees.
    needed = smallest_accepted_frames(embedder.model)
    assert needed == 9
    assert f"short.wav: 0.040 s gives 2 frames, the model needs at least {needed}" in message
    assert "broken.wav: not a readable audio file" in message
    assert counting.utterances == 0


@pytest.mark.slow
def test_torchrun_ranks_and_cli_match_single_process(tmp_path, mini_data, embedder):
    checkpoint = tmp_path / "model.pt"
    save_embedding_model(embedder.model, checkpoint)
    wav_scp = mini_data.test_dir / "wav.scp"
    single = read_embeddings(
        extract_embeddings(wav_scp, embedder, tmp_path / "single", progress=False)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "speakerlab",
        "extract",
        "--model",
        str(checkpoint),
        "--wav-scp",
        str(wav_scp),
        "--out-dir",
        str(tmp_path / "ranks"),
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    run = run_bounded(command, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    ranked = read_embeddings(tmp_path / "ranks" / "embedding.scp")
    assert list(ranked) == list(single) and len(single) == len(wav_scp.read_text().splitlines())
    for key in single:
        np.testing.assert_allclose(ranked[key], single[key], atol=1e-5)
