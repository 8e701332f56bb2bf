"""Running a model: long recordings in windows, batching, loading, the shortest accepted input."""

import numpy as np
import pytest
import soundfile
import torch
from scipy.signal import lfilter
from test_onnx import reference_model

from speakerlab.embedder import (
    TorchEmbedder,
    Windows,
    embed_windowed,
    load_embedder,
    window_frames_for,
    window_shape,
    window_spans,
)
from speakerlab.errors import ConfigError
from speakerlab.features import fbank
from speakerlab.inference import SpeakerVerifier
from speakerlab.models.checkpoint import save_embedding_model

RATE = 16000


def test_window_spans_by_hand():
    # 40240 samples = 400 + 249 * 160: 250 frames. With windows of at most 100 frames: 3 windows
    # of ceil(250 / 3) = 84 frames (400 + 83 * 160 = 13680 samples), the first starting at frame
    # 0 and the last ending with the recording (frame 166), the middle one halfway (frame 83).
    assert window_shape(40240, 100) == (3, 84)
    assert window_spans(40240, 100) == [(0, 13680), (83 * 160, 13680), (166 * 160, 13680)]
    # A recording that fits one window is embedded whole: the extra samples too.
    assert window_spans(40240, 250) == [(0, 40240)]
    assert window_spans(40300, 250) == [(0, 40300)]
    # 60 s is 5998 frames (1 + (960000 - 400) // 160): a 60 s recording is one window.
    assert window_frames_for(60.0) == 5998
    assert window_spans(960000, window_frames_for(60.0)) == [(0, 960000)]


@pytest.mark.parametrize("num_samples", [16000, 40241, 96000, 160000 + 37, 321111])
def test_windows_cover_the_recording_with_equal_frame_counts(num_samples):
    window_frames = 150
    spans = window_spans(num_samples, window_frames)
    frames = [1 + (length - 400) // 160 for _, length in spans]
    assert len(set(frames)) == 1 and frames[0] <= window_frames
    assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] <= num_samples
    # Frames of the whole recording: each window starts on its grid, they leave no gap, and
    # the last one reaches the whole recording's last frame.
    total = 1 + (num_samples - 400) // 160
    starts = [start // 160 for start, _ in spans]
    assert all(start % 160 == 0 for start, _ in spans)
    assert all(b - a <= frames[0] for a, b in zip(starts, starts[1:]))
    assert starts[-1] + frames[0] == total
    assert len(spans) == -(-total // window_frames)  # the fewest windows of at most 150 frames


def test_a_long_recording_is_the_mean_of_its_windows():
    model = reference_model("ecapa_tdnn")
    verifier = SpeakerVerifier(TorchEmbedder(model), window_seconds=1.0, max_batch_frames=150)
    wav = torch.from_numpy(
        (0.1 * np.random.default_rng(0).standard_normal(int(3.3 * RATE))).astype(np.float32)
    )
    # By hand: 3.3 s is 328 frames; windows of at most 98 frames (1 s): 4 of 82 frames, starting
    # at frames 0, 82, 164, 246 (246 * k / 3); each embedded alone with its own mean removal.
    length = 400 + 81 * 160
    expected = []
    for start in (0, 82, 164, 246):
        piece = wav[start * 160 : start * 160 + length]
        with torch.inference_mode():
            expected.append(model(fbank(piece).unsqueeze(0))[0].numpy())
    np.testing.assert_allclose(verifier.embed(wav), np.mean(expected, axis=0), atol=1e-5)
    # The batch budget (150 frames: one window per model call) changes nothing but speed.
    wide = SpeakerVerifier(TorchEmbedder(model), window_seconds=1.0, max_batch_frames=10_000)
    np.testing.assert_allclose(wide.embed(wav), verifier.embed(wav), atol=1e-5)


def test_recordings_up_to_the_window_are_embedded_whole():
    model = reference_model("campplus")
    wav = torch.from_numpy(
        (0.1 * np.random.default_rng(1).standard_normal(RATE)).astype(np.float32)
    )
    embedder = TorchEmbedder(model)
    whole = embedder(fbank(wav).unsqueeze(0))[0]  # the same embedder given all 98 frames at once
    exactly = SpeakerVerifier(embedder, window_seconds=1.0)  # 98 frames: all of it
    np.testing.assert_array_equal(exactly.embed(wav), whole)


def stationary_signals(count=6, seconds=8.0, seed=0):
    """Recordings whose statistics do not change over time: coloured noise and three tones,
    different for each recording."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    signals = []
    for i in range(count):
        noise = lfilter([1.0], [1.0, -0.5 - 0.08 * i], rng.standard_normal(t.size))
        tones = sum(
            np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
            for f in (110 + 37 * i, 220 + 71 * i, 900 + 150 * i)
        )
        signals.append((0.05 * noise / noise.std() + 0.1 * tones / 3).astype(np.float32))
    return signals


def test_windowed_embeddings_approximate_whole_ones():
    """Tolerance: every 2 s window of a stationary recording has the statistics of the whole
    recording up to estimation noise, so the windowed embedding must stay close to the whole
    one. Measured around the mean embedding of the set (the fixture models are untrained: their
    embeddings share a large common part that would make any raw cosine close to 1), it must
    have cosine >= 0.9 with its own whole-utterance embedding and be nearer to it than to any
    other recording's. The ECAPA fixture is the one whose embeddings tell these recordings apart
    (centred cosines between different recordings stay below 0.6); the small ResNets map them
    to nearly one point."""
    model = reference_model("ecapa_tdnn")
    signals = stationary_signals()
    whole = SpeakerVerifier(TorchEmbedder(model)).embed_many(signals)
    windowed = SpeakerVerifier(TorchEmbedder(model), window_seconds=2.0).embed_many(signals)

    def centred(matrix):
        matrix = matrix - whole.mean(axis=0)
        return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)

    cosines = centred(windowed) @ centred(whole).T
    assert np.diag(cosines).min() >= 0.9
    assert (cosines.argmax(axis=1) == np.arange(len(signals))).all()
    between = centred(whole) @ centred(whole).T
    assert between[~np.eye(len(signals), dtype=bool)].max() < 0.6


def test_embed_windowed_batches_equal_lengths_within_the_budget():
    calls = []

    class Recording(TorchEmbedder):
        def embed_features(self, feats):
            calls.append(tuple(feats.shape[:2]))
            return super().embed_features(feats)

    embedder = Recording(reference_model("campplus"))
    generator = torch.Generator().manual_seed(0)

    def windows(frames: int, window_frames: int) -> Windows:
        num_samples = 400 + 160 * (frames - 1)
        wav = torch.randn(num_samples, generator=generator)
        return Windows(wav, num_samples, window_frames, 80)

    # (windows, frames): (1, 120), (3, 100), (1, 120), (1, 100)
    items = [windows(120, 120), windows(300, 100), windows(120, 120), windows(100, 100)]
    assert [item.shape for item in items] == [(1, 120), (3, 100), (1, 120), (1, 100)]
    result = embed_windowed(embedder, items, max_batch_frames=250)
    # 120-frame windows: 2 per call; 100-frame windows (3 + 1): 2 per call, the second call
    # holding the last window of one recording and the only window of another.
    assert sorted(calls) == [(2, 100), (2, 100), (2, 120)]
    one_by_one = [embedder.embed_features(item.fbank()).mean(axis=0) for item in items]
    np.testing.assert_allclose(result, np.stack(one_by_one), atol=1e-5)


def test_a_long_file_is_read_a_window_at_a_time_with_the_same_result(tmp_path):
    """A 16 kHz file of several windows is read window by window (no more than a window in
    memory) and gives exactly the fbank, and the embedding, of the same audio in memory."""
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(RATE * 7 + 123)).astype(np.float32)
    path = tmp_path / "long.wav"
    soundfile.write(path, wav, RATE, subtype="FLOAT")
    window_frames = window_frames_for(2.0)
    from_file = Windows(str(path), len(wav), window_frames, 80)
    in_memory = Windows(torch.from_numpy(wav), len(wav), window_frames, 80)
    assert from_file.shape == in_memory.shape and from_file.shape[0] == 4
    assert torch.equal(from_file.fbank(), in_memory.fbank())
    assert torch.equal(from_file.fbank(1, 3), in_memory.fbank()[1:3])
    assert torch.equal(in_memory.made().fbank(), in_memory.fbank())

    verifier = SpeakerVerifier(TorchEmbedder(reference_model("campplus")), window_seconds=2.0)
    streamed = verifier.window_features(path)
    assert isinstance(streamed.audio, (str, type(path)))  # the file, not its samples
    np.testing.assert_array_equal(verifier.embed(path), verifier.embed(wav))


def test_short_windows_and_bad_backends_are_refused(tmp_path):
    model = reference_model("campplus")
    verifier = SpeakerVerifier(TorchEmbedder(model), window_seconds=0.04)
    with pytest.raises(ConfigError, match="window of 2 frames is too short"):
        verifier.embed(np.zeros(RATE, np.float32))
    with pytest.raises(ConfigError, match="must be positive"):
        SpeakerVerifier(TorchEmbedder(model), window_seconds=0)
    checkpoint = tmp_path / "m.pt"
    save_embedding_model(model, checkpoint)
    with pytest.raises(ConfigError, match="give a path to export it to"):
        load_embedder(checkpoint, "cpu", backend="onnx")
    with pytest.raises(ConfigError, match="choose one of auto, torch, onnx"):
        load_embedder(checkpoint, "cpu", backend="tensorflow", onnx_path=tmp_path / "m.onnx")


def test_identity_follows_the_weights():
    model = reference_model("campplus")
    same = TorchEmbedder(reference_model("campplus"))
    assert TorchEmbedder(model).identity == same.identity
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert TorchEmbedder(model).identity != same.identity
