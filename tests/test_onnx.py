"""ONNX export of every architecture: dynamic axes, parity with PyTorch, the ORT backend."""

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from speakerlab.bin import export_onnx as export_cli
from speakerlab.bin import extract as extract_cli
from speakerlab.embedder import OnnxEmbedder, TorchEmbedder, choose_backend
from speakerlab.embedding_store import read_embeddings
from speakerlab.errors import CheckpointError, ConfigError
from speakerlab.extract import extract_embeddings
from speakerlab.inference import SpeakerVerifier
from speakerlab.models import build_model
from speakerlab.models.checkpoint import save_embedding_model
from speakerlab.onnx_export import export_onnx

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
SMALL_CONFIGS = {
    "eres2net": dict(feat_dim=80, embedding_size=32, m_channels=8),
    "eres2netv2": dict(feat_dim=80, embedding_size=32, m_channels=8),
    "campplus": dict(feat_dim=80, embedding_size=32, growth_rate=8, bn_size=2, init_channels=16),
    "ecapa_tdnn": dict(
        feat_dim=80,
        embedding_size=32,
        channels=[64, 64, 64, 64, 192],
        attention_channels=16,
        se_channels=16,
    ),
}


def reference_model(name):
    """Small model with the reference fixture's weights (trained-like batch-norm statistics)."""
    model = build_model(name, **SMALL_CONFIGS[name])
    fixture = torch.load(REFERENCE / f"{name}_small.pt", weights_only=True)
    model.load_state_dict(fixture["state_dict"])
    return model.eval()


def cosines(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_onnx_matches_pytorch_at_any_batch_and_length(name, tmp_path):
    model = reference_model(name)
    path = export_onnx(model, tmp_path / f"{name}.onnx", metadata={"model_name": name})
    embedder = OnnxEmbedder(path)
    assert embedder.feat_dim == 80
    assert embedder.metadata.pop("export_key")  # a digest of what the export depends on
    assert embedder.metadata == {"feat_dim": 80, "model_name": name}
    generator = torch.Generator().manual_seed(1)
    # Two frame counts and batch sizes, both different from the export's example (2 x 200).
    for batch, frames in ((1, 137), (3, 401)):
        feats = torch.randn(batch, frames, 80, generator=generator)
        with torch.inference_mode():
            expected = model(feats).numpy()
        actual = embedder(feats)
        assert actual.shape == (batch, 32)
        assert cosines(expected, actual).min() >= 0.9999
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-3)
    # The same shortest accepted input as the PyTorch model.
    assert embedder.min_frames == TorchEmbedder(model).min_frames


def write_recordings(directory, count=5):
    directory.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        path = directory / f"r{i}.wav"
        seconds = 1.0 if i < 3 else 1.3 + 0.2 * i
        soundfile.write(
            path, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000
        )
        lines.append(f"r{i} {path}\n")
    (directory / "wav.scp").write_text("".join(lines))
    return directory / "wav.scp"


@pytest.mark.slow
def test_onnx_backend_for_extraction_and_verification(tmp_path, capsys):
    model = reference_model("ecapa_tdnn")
    checkpoint = tmp_path / "ecapa.pt"
    save_embedding_model(model, checkpoint)
    onnx_path = tmp_path / "ecapa.onnx"
    export_cli.main(["--model", str(checkpoint), "--out", str(onnx_path)])
    printed = capsys.readouterr().out
    assert "ONNX Runtime matches PyTorch: smallest cosine similarity" in printed

    wav_scp = write_recordings(tmp_path / "wavs")
    with_torch = read_embeddings(
        extract_embeddings(wav_scp, TorchEmbedder(model), tmp_path / "torch", progress=False)
    )
    onnx_embedder = OnnxEmbedder(onnx_path)
    assert onnx_embedder.metadata["model_name"] == "ecapa_tdnn"
    assert "threshold" not in onnx_embedder.metadata  # unknown for our own checkpoints
    with_onnx = read_embeddings(
        extract_embeddings(wav_scp, onnx_embedder, tmp_path / "onnx", progress=False)
    )
    # On the CPU the extract command exports a checkpoint itself and runs ONNX Runtime: by
    # default, and with --backend onnx; --backend torch keeps PyTorch (not for .onnx files).
    assert choose_backend("auto", torch.device("cpu")) == "onnx"
    assert choose_backend("auto", torch.device("cuda")) == "torch"
    assert choose_backend("auto", torch.device("cuda"), "m.onnx") == "onnx"
    assert choose_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ConfigError, match="runs with ONNX Runtime, not PyTorch"):
        choose_backend("torch", torch.device("cpu"), "m.onnx")
    extract_cli.main(
        [
            "--model",
            str(checkpoint),
            "--wav-scp",
            str(wav_scp),
            "--out-dir",
            str(tmp_path / "cli"),
            "--num-workers",
            "0",
            "--no-progress",
        ]
    )
    assert (tmp_path / "cli" / "model.onnx").is_file()
    extract_cli.main(
        [
            "--model",
            str(checkpoint),
            "--wav-scp",
            str(wav_scp),
            "--out-dir",
            str(tmp_path / "cli_torch"),
            "--backend",
            "torch",
            "--num-workers",
            "0",
            "--no-progress",
        ]
    )
    assert not (tmp_path / "cli_torch" / "model.onnx").exists()
    np.testing.assert_allclose(
        np.stack(list(read_embeddings(tmp_path / "cli_torch" / "embedding.scp").values())),
        np.stack(list(with_torch.values())),
        atol=1e-6,
    )
    with_cli = read_embeddings(tmp_path / "cli" / "embedding.scp")
    assert list(with_onnx) == list(with_torch) == list(with_cli)
    for key in with_torch:
        assert cosines(with_onnx[key][None], with_torch[key][None])[0] >= 0.9999
        np.testing.assert_allclose(with_cli[key], with_onnx[key], atol=1e-5)

    verifier = SpeakerVerifier.load(onnx_path, threshold=0.3)
    torch_verifier = SpeakerVerifier(TorchEmbedder(model), threshold=0.3)
    pair = (tmp_path / "wavs" / "r0.wav", tmp_path / "wavs" / "r4.wav")
    assert verifier.score(*pair) == pytest.approx(torch_verifier.score(*pair), abs=1e-4)


def test_onnx_threshold_metadata_and_errors(tmp_path):
    model = build_model("ecapa_tdnn", **SMALL_CONFIGS["ecapa_tdnn"]).eval()
    path = export_onnx(model, tmp_path / "m.onnx", metadata={"threshold": 0.42})
    assert SpeakerVerifier.load(path).threshold == 0.42
    assert SpeakerVerifier.load(path, threshold=0.1).threshold == 0.1
    with pytest.raises(CheckpointError, match="ONNX model not found"):
        OnnxEmbedder(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a loadable ONNX model"):
        OnnxEmbedder(tmp_path / "bad.onnx")
