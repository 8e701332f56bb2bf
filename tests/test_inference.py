"""Python API and the verify/embed commands: inputs of every kind, decisions, clear errors."""

import sys
import types

import kaldiio
import numpy as np
import pytest
import soundfile
import torch

from speakerlab import inference
from speakerlab.bin import embed as embed_cli
from speakerlab.bin import verify as verify_cli
from speakerlab.embedder import TorchEmbedder
from speakerlab.errors import AudioError, CheckpointError, ConfigError
from speakerlab.features import fbank
from speakerlab.inference import SpeakerVerifier, prepare_waveform
from speakerlab.models import build_model
from speakerlab.models.checkpoint import save_embedding_model
from speakerlab.resample import resample

RATE = 16000


def tone(seconds, freq, rate=RATE, seed=0):
    t = np.arange(int(seconds * rate)) / rate
    noise = 0.02 * np.random.default_rng(seed).standard_normal(t.size)
    return (0.4 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(
        "campplus", embedding_size=32, growth_rate=8, bn_size=2, init_channels=16
    ).eval()


@pytest.fixture(scope="module")
def verifier(model):
    return SpeakerVerifier(TorchEmbedder(model), threshold=0.5, source="test model")


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "campplus_small.pt"
    save_embedding_model(model, path)
    return path


@pytest.fixture()
def wavs(tmp_path):
    paths = {}
    for name, freq, seconds in (("a", 180, 1.2), ("b", 240, 1.0), ("c", 600, 1.5)):
        paths[name] = tmp_path / f"{name}.wav"
        soundfile.write(paths[name], tone(seconds, freq, seed=len(paths)), RATE)
    return paths


def direct_embedding(model, wav):
    with torch.inference_mode():
        return model(fbank(torch.as_tensor(wav)).unsqueeze(0))[0].numpy()


def cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_inputs_of_every_kind_give_the_same_embedding(verifier, model, wavs):
    wav = tone(1.2, 180, seed=1)
    expected = direct_embedding(model, wav)
    np.testing.assert_allclose(verifier.embed(wavs["a"]), expected, atol=1e-5)
    np.testing.assert_allclose(verifier.embed(str(wavs["a"])), expected, atol=1e-5)
    np.testing.assert_allclose(verifier.embed(wav), expected, atol=1e-5)
    np.testing.assert_allclose(verifier.embed(torch.from_numpy(wav)), expected, atol=1e-5)
    # Multi-channel: channel 0 is used, whichever axis holds the channels.
    stereo = np.stack([wav, np.zeros_like(wav)])
    np.testing.assert_allclose(verifier.embed(stereo), expected, atol=1e-5)
    np.testing.assert_allclose(verifier.embed(stereo.T.copy()), expected, atol=1e-5)
    # 16-bit integers are scaled to [-1, 1].
    as_int16 = np.round(wav * 32767).astype(np.int16)
    np.testing.assert_allclose(verifier.embed(as_int16), expected, atol=2e-3)
    normalised = verifier.embed(wav, normalize=True)
    assert np.linalg.norm(normalised) == pytest.approx(1.0, abs=1e-6)


def test_other_sample_rates_are_resampled_to_16k(verifier, model, tmp_path):
    wav8k = tone(1.2, 180, rate=8000)
    expected_wave = resample(torch.from_numpy(wav8k), 8000, RATE)
    assert prepare_waveform(wav8k, 8000).shape == expected_wave.shape
    expected = direct_embedding(model, expected_wave)
    np.testing.assert_allclose(verifier.embed(wav8k, sample_rate=8000), expected, atol=1e-5)
    path = tmp_path / "stereo_8k.wav"
    soundfile.write(path, np.stack([wav8k, -wav8k], axis=1), 8000)
    np.testing.assert_allclose(verifier.embed(path), expected, atol=1e-5)


def test_scores_and_decisions(verifier, model, wavs):
    a, b = (
        direct_embedding(model, tone(1.2, 180, seed=1)),
        direct_embedding(model, tone(1.0, 240, seed=2)),
    )
    assert verifier.score(wavs["a"], wavs["b"]) == pytest.approx(cosine(a, b), abs=1e-5)
    assert verifier.score(wavs["a"], wavs["a"]) == pytest.approx(1.0, abs=1e-6)

    results = verifier.verify_pairs(
        [(wavs["a"], wavs["a"]), (wavs["a"], wavs["b"]), (wavs["b"], wavs["c"])]
    )
    scores = [r.score for r in results]
    assert scores[1] == pytest.approx(cosine(a, b), abs=1e-5)
    assert all(r.threshold == 0.5 and r.same_speaker == (r.score >= 0.5) for r in results)
    assert results[0].same_speaker
    # The threshold can be overridden per call.
    above = verifier.verify(wavs["a"], wavs["b"], threshold=scores[1] - 1e-3)
    below = verifier.verify(wavs["a"], wavs["b"], threshold=scores[1] + 1e-3)
    assert above.same_speaker and not below.same_speaker


def test_embed_many_equals_one_at_a_time(verifier, wavs):
    inputs = [wavs["a"], wavs["b"], tone(1.2, 300), wavs["c"], tone(1.2, 500, seed=9)]
    batched = verifier.embed_many(inputs)
    for row, audio in zip(batched, inputs):
        np.testing.assert_allclose(row, verifier.embed(audio), atol=1e-5)


def smallest_accepted_frames(model, limit=100):
    """Brute force, independent of the embedder's binary search: the shortest input (frames)
    that the model turns into a finite embedding."""
    generator = torch.Generator().manual_seed(3)
    for frames in range(1, limit):
        try:
            with torch.inference_mode():
                out = model(torch.randn(1, frames, 80, generator=generator))
        except Exception:
            continue
        if torch.isfinite(out).all():
            return frames
    raise AssertionError("no accepted length")


def test_too_short_audio_names_the_length_the_model_needs(verifier, model):
    needed = smallest_accepted_frames(model)
    # Kaldi framing: n frames need a 25 ms window plus n - 1 shifts of 10 ms.
    seconds = (25 + 10 * (needed - 1)) / 1000
    just_enough = int(seconds * RATE)
    verifier.embed(tone(just_enough / RATE, 200))
    with pytest.raises(AudioError) as error:
        verifier.embed(np.zeros(just_enough - 1, np.float32))
    assert str(error.value) == (
        f"audio array: {(just_enough - 1) / RATE:.3f} s of audio is too short; the model needs "
        f"at least {seconds:.3f} s ({needed} frames)"
    )


@pytest.mark.parametrize(
    "audio, message",
    [
        (np.zeros(0, np.float32), "audio array: audio is empty"),
        (np.zeros((2, 0), np.float32), "audio array: audio is empty"),
        (np.full(16000, np.nan, np.float32), "NaN or infinite"),
        (np.zeros((2, 3, 16000), np.float32), "expected 1-D .* got shape"),
    ],
)
def test_unusable_arrays_raise_clear_errors(verifier, audio, message):
    with pytest.raises(AudioError, match=message):
        verifier.embed(audio)


def test_unusable_files_raise_clear_errors(verifier, tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....garbage")
    with pytest.raises(AudioError, match=f"{broken}: not a readable audio file"):
        verifier.embed(broken)
    with pytest.raises(AudioError, match="missing.wav: file not found"):
        verifier.embed(tmp_path / "missing.wav")
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), RATE)
    with pytest.raises(AudioError, match="empty.wav: audio is empty"):
        verifier.embed(empty)
    short = tmp_path / "short.wav"
    soundfile.write(short, np.zeros(500, np.float32), RATE)
    with pytest.raises(AudioError, match=r"short.wav: 0.031 s of audio is too short"):
        verifier.embed(short)
    with pytest.raises(AudioError, match="expected a file path, numpy array or torch tensor"):
        verifier.embed(12345)


def test_checkpoint_path_needs_a_threshold(checkpoint, wavs):
    loaded = SpeakerVerifier.load(checkpoint)
    assert loaded.threshold is None
    with pytest.raises(ConfigError, match="no decision threshold is known"):
        loaded.verify(wavs["a"], wavs["b"])
    assert loaded.score(wavs["a"], wavs["b"]) == pytest.approx(
        SpeakerVerifier.load(checkpoint, threshold=0.3).verify(wavs["a"], wavs["b"]).score
    )


def test_a_released_checkpoint_file_keeps_its_threshold(tmp_path):
    # A file downloaded by hand: recognised by its released name and its architecture.
    released = tmp_path / "campplus_cn_common.bin"
    save_embedding_model(build_model("campplus", embedding_size=192).eval(), released)
    assert SpeakerVerifier.load(released).threshold == pytest.approx(0.249)
    renamed = tmp_path / "my_model.bin"
    released.rename(renamed)
    assert SpeakerVerifier.load(renamed).threshold is None
    other = tmp_path / "campplus_cn_common.bin"  # the released name, another architecture
    save_embedding_model(build_model("campplus", embedding_size=64).eval(), other)
    assert SpeakerVerifier.load(other).threshold is None


def test_unknown_model_sources_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="neither a checkpoint file nor a known model id"):
        SpeakerVerifier.load(tmp_path / "nope.ckpt")
    model_id = "iic/speech_eres2net_base_sv_zh-cn_3dspeaker_16k"
    # Without modelscope (whether or not it is installed here): the error says how to get it.
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(CheckpointError, match="needs the 'modelscope' package"):
        SpeakerVerifier.load(model_id)
    # With a modelscope whose download fails (no network): the error says so and what to do.
    fake = types.ModuleType("modelscope.hub.snapshot_download")

    def unreachable(model_id, cache_dir=None):
        raise ConnectionError("modelscope.cn is unreachable")

    fake.snapshot_download = unreachable
    for name in ("modelscope", "modelscope.hub"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "modelscope.hub.snapshot_download", fake)
    with pytest.raises(CheckpointError, match="download failed .*unreachable.*pass its path"):
        SpeakerVerifier.load(model_id)


def test_module_level_embed_and_verify(checkpoint, model, wavs, tmp_path):
    a, b = (
        direct_embedding(model, tone(1.2, 180, seed=1)),
        direct_embedding(model, tone(1.0, 240, seed=2)),
    )
    np.testing.assert_allclose(inference.embed(wavs["a"], model=checkpoint), a, atol=1e-5)
    both = inference.embed([wavs["a"], wavs["b"]], model=checkpoint)
    assert both.shape == (2, 32)
    np.testing.assert_allclose(both[1], b, atol=1e-5)
    result = inference.verify(wavs["a"], wavs["b"], model=checkpoint, threshold=0.2)
    assert result.score == pytest.approx(cosine(a, b), abs=1e-5)
    assert result.same_speaker == (cosine(a, b) >= 0.2) and result.threshold == 0.2
    with pytest.raises(ConfigError, match="no decision threshold is known"):
        inference.verify(wavs["a"], wavs["b"], model=checkpoint)

    # A model file rewritten with other weights (a retrained model exported to the same path)
    # is loaded again, not served from the cache.
    path = tmp_path / "model.pt"
    save_embedding_model(model, path)
    first = inference.embed(wavs["a"], model=path)
    torch.manual_seed(5)
    other = build_model(
        "campplus", embedding_size=32, growth_rate=8, bn_size=2, init_channels=16
    ).eval()
    save_embedding_model(other, path)
    second = inference.embed(wavs["a"], model=path)
    np.testing.assert_allclose(first, a, atol=1e-5)
    np.testing.assert_allclose(second, direct_embedding(other, tone(1.2, 180, seed=1)), atol=1e-5)


def test_verify_cli(checkpoint, wavs, capsys):
    verify_cli.main(
        [str(wavs["a"]), str(wavs["a"]), "--model", str(checkpoint), "--threshold", "0.4"]
    )
    assert capsys.readouterr().out.splitlines() == [
        "score: 1.0000",
        "decision: same speaker (threshold 0.4)",
    ]
    verify_cli.main(
        [str(wavs["a"]), str(wavs["c"]), "--model", str(checkpoint), "--threshold", "1.01"]
    )
    assert "decision: different speakers (threshold 1.01)" in capsys.readouterr().out


def test_verify_cli_errors_are_one_line(checkpoint, wavs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        verify_cli.main(
            [
                str(wavs["a"]),
                str(tmp_path / "gone.wav"),
                "--model",
                str(checkpoint),
                "--threshold",
                "0.4",
            ]
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("speakerlab verify: error: ") and err.count("\n") == 1
    assert "gone.wav: file not found" in err
    with pytest.raises(SystemExit) as exit_info:
        verify_cli.main([str(wavs["a"]), str(wavs["b"]), "--model", str(checkpoint)])
    assert "no decision threshold is known" in capsys.readouterr().err


def test_embed_cli_files_and_wav_scp(checkpoint, verifier, wavs, tmp_path, capsys):
    embed_cli.main(
        [
            str(wavs["a"]),
            str(wavs["b"]),
            "--model",
            str(checkpoint),
            "--out-dir",
            str(tmp_path / "files"),
        ]
    )
    assert "wrote 2 embeddings of dimension 32" in capsys.readouterr().out
    got = dict(kaldiio.load_scp(str(tmp_path / "files" / "embedding.scp")))
    assert list(got) == ["a", "b"]
    np.testing.assert_allclose(got["a"], verifier.embed(wavs["a"]), atol=1e-5)
    np.testing.assert_allclose(got["b"], verifier.embed(wavs["b"]), atol=1e-5)

    scp = tmp_path / "wav.scp"
    scp.write_text(f"first {wavs['c']}\nsecond {wavs['a']}\n")
    embed_cli.main(
        [
            "--wav-scp",
            str(scp),
            "--model",
            str(checkpoint),
            "--normalize",
            "--out-dir",
            str(tmp_path / "scp"),
        ]
    )
    got = dict(kaldiio.load_scp(str(tmp_path / "scp" / "embedding.scp")))
    assert list(got) == ["first", "second"]
    np.testing.assert_allclose(got["first"], verifier.embed(wavs["c"], normalize=True), atol=1e-5)

    with pytest.raises(SystemExit) as exit_info:
        embed_cli.main(
            [
                str(wavs["a"]),
                "--wav-scp",
                str(scp),
                "--model",
                str(checkpoint),
                "--out-dir",
                str(tmp_path / "both"),
            ]
        )
    assert exit_info.value.code == 1
    assert "give either audio files or --wav-scp" in capsys.readouterr().err
