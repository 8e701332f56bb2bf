"""Fast CPU inference (issue 15, part 3): FLOP accounting, batch-norm folding, bf16, int8
quantisation, and their use through load_embedder and the commands."""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import run_bounded
from test_onnx import reference_model
from torch import nn

from speakerlab import cpu_inference, flops
from speakerlab.cpu_inference import (
    bf16_unsupported_reason,
    conv_batch_norm_pairs,
    fold_batch_norms,
    prepare_cpu_model,
    restore,
)
from speakerlab.embedder import OnnxEmbedder, TorchEmbedder, check_precision, load_embedder
from speakerlab.errors import CheckpointError, ConfigError
from speakerlab.features import fbank


def speech_like_fbank(seed: int, seconds: float = 3.0) -> torch.Tensor:
    """fbank of a gliding harmonic tone in noise: activations like those of real speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    pitch = 100 + 80 * rng.random() + 30 * np.sin(2 * np.pi * rng.uniform(0.3, 2.0) * t)
    phase = 2 * np.pi * np.cumsum(pitch) / 16000
    wav = sum(np.sin(k * phase) / k for k in range(1, 12)) * 0.1
    wav = wav * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.size)
    return fbank(torch.from_numpy(wav.astype(np.float32)))


def plain(model: nn.Module, feats: torch.Tensor) -> np.ndarray:
    """The unprepared model's embeddings: the reference every faster path is compared with."""
    with torch.inference_mode():
        return model.eval()(feats).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --------------------------------------------------------------------------- FLOP accounting


class FrameLinear(nn.Module):
    feat_dim = 20

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(20, 7)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(feats).mean(dim=1)


class FrameConv(nn.Module):
    feat_dim = 20

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(20, 6, kernel_size=5, stride=2)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv(feats.transpose(1, 2)).mean(dim=2)


def test_model_flops_count_matrix_products_by_hand():
    # Linear on every frame: (frames x 20) @ (20 x 7), 2 FLOPs per multiply-add.
    assert flops.model_flops(FrameLinear(), 50) == 2 * 50 * 20 * 7
    # Conv1d: each of the (50 - 5) // 2 + 1 = 23 outputs of each of 6 channels is a dot product
    # of length 20 * 5.
    assert flops.model_flops(FrameConv(), 50) == 2 * 23 * 6 * 20 * 5
    assert flops.model_flops_per_length(FrameConv(), [50, 9, 50]) == {
        9: 2 * 3 * 6 * 20 * 5,
        50: 2 * 23 * 6 * 20 * 5,
    }


def test_model_flops_leave_the_model_untouched():
    model = FrameLinear()
    before = model.linear.weight.clone()
    flops.model_flops(model, 10)
    assert model.linear.weight.device.type == "cpu"
    assert torch.equal(model.linear.weight, before)


def test_matmul_rate_is_2n3_per_timed_product():
    ticks = iter(range(0, 1000, 2))  # each product "takes" 2 s on this clock

    def clock() -> float:
        return float(next(ticks))

    rate = flops.matmul_flops_per_second(size=8, min_seconds=0.0, clock=clock)
    assert rate == pytest.approx(2 * 8**3 / 2)
    ticks = iter(range(0, 1000, 4))
    rate = flops.onnxruntime_matmul_flops_per_second(
        size=8, num_threads=1, min_seconds=0.0, clock=clock
    )
    assert rate == pytest.approx(2 * 8**3 / 4)


# --------------------------------------------------------------------------- folding, fp32


# ECAPA-TDNN normalises after the ReLU that follows each convolution: nothing to fold.
@pytest.mark.parametrize(
    "name, foldable",
    [("eres2net", True), ("eres2netv2", True), ("campplus", True), ("ecapa_tdnn", False)],
)
def test_folding_batch_norms_keeps_the_embeddings(name, foldable):
    model = reference_model(name)
    feats = torch.randn(2, 237, 80, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(feats).numpy()
    example = torch.randn(1, 100, 80, generator=torch.Generator().manual_seed(0))
    pairs = conv_batch_norm_pairs(model, example)
    replaced = fold_batch_norms(model, example)
    assert len(replaced) == 2 * len(pairs) and bool(pairs) == foldable
    assert conv_batch_norm_pairs(model, example) == []  # nothing foldable is left
    with torch.inference_mode():
        np.testing.assert_allclose(model(feats).numpy(), expected, rtol=1e-4, atol=1e-4)
    restore(replaced)
    assert conv_batch_norm_pairs(model, example) == pairs
    with torch.inference_mode():
        np.testing.assert_array_equal(model(feats).numpy(), expected)


def test_every_batch_norm_of_eres2net_follows_a_convolution():
    # ERes2Net puts a batch norm right after each of its 2-D convolutions.
    model = reference_model("eres2net")
    batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(conv_batch_norm_pairs(model, torch.randn(1, 100, 80))) == batch_norms


class ConvNormSum(nn.Module):
    """``bn(conv(x))``, plus ``conv(x)`` itself when the input is longer than ``reuse_above``
    frames: there the batch norm cannot be folded into the convolution without changing the
    sum."""

    feat_dim = 8

    def __init__(self, reuse_above: int) -> None:
        super().__init__()
        self.reuse_above = reuse_above
        self.conv = nn.Conv1d(8, 8, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1.0, 1.0)
            self.bn.running_var.uniform_(0.2, 3.0)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(feats.transpose(1, 2))
        out = self.bn(hidden)
        if feats.shape[1] > self.reuse_above:
            out = out + hidden
        return out.mean(dim=2)


def test_a_convolution_output_used_twice_is_not_folded():
    model = ConvNormSum(reuse_above=0).eval()
    assert conv_batch_norm_pairs(model, torch.randn(1, 50, 8)) == []
    assert len(conv_batch_norm_pairs(ConvNormSum(reuse_above=60), torch.randn(1, 50, 8))) == 1


def test_prepare_cpu_model_undoes_a_fold_that_changes_the_output():
    # The pairs are found on 100 frames, the check runs on more: the second use shows there.
    model = ConvNormSum(reuse_above=110).eval()
    feats = torch.randn(3, 150, 8)
    with torch.inference_mode():
        expected = model(feats)
    with pytest.warns(UserWarning, match="changed ConvNormSum's embeddings"):
        prepared = prepare_cpu_model(model)
    assert isinstance(prepared.bn, nn.BatchNorm1d)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(feats), expected)


def test_cpu_embedder_fp32_matches_the_plain_model():
    model = reference_model("eres2net")
    feats = torch.randn(2, 301, 80, generator=torch.Generator().manual_seed(2))
    expected = plain(model, feats)
    embedder = TorchEmbedder(model)
    actual = embedder(feats)
    assert any(isinstance(m, nn.Identity) for m in embedder.runner.modules())  # folded
    assert not any(isinstance(m, nn.Identity) for m in model.modules())  # the caller's: not
    assert embedder.model is model
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


REUSE_CHECK = """
import resource, sys
import numpy as np
from speakerlab.cpu_inference import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def forward():  # like a network's activations: large tensors of a few sizes alive at once
    alive = [np.ones(megabytes << 17) for megabytes in (16, 12, 20, 8, 16, 24)]
    return sum(a[0] for a in alive)
forward()
start = faults()
for _ in range(10):
    forward()
print(faults() - start)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_reuse_freed_memory_stops_page_faults_on_large_tensors():
    def faults(mode: str) -> int:
        done = run_bounded([sys.executable, "-c", REUSE_CHECK, mode], timeout=60)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    # By default the 96 MB of each pass are mapped afresh (tens of thousands of page faults
    # over 10 passes); reused memory is already mapped.
    assert faults("default") > 10_000
    assert faults("reuse") < 1_000


# --------------------------------------------------------------------------- bf16


def test_bf16_is_refused_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert "no bfloat16 instructions" in bf16_unsupported_reason()
    with pytest.raises(ConfigError, match="bf16 inference refused: this CPU has no bfloat16"):
        TorchEmbedder(reference_model("eres2net"), precision="bf16")
    # AMX alone is enough.
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert bf16_unsupported_reason() is None


def test_bf16_is_refused_without_onednn(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no oneDNN"):
        cpu_inference.require_bf16()


def test_unknown_precision_is_an_error():
    with pytest.raises(ConfigError, match="precision 'fp16': choose one of fp32, bf16"):
        TorchEmbedder(reference_model("eres2net"), precision="fp16")


def test_bf16_is_refused_off_the_cpu_and_for_onnx_files(tmp_path):
    with pytest.raises(ConfigError, match="runs on the CPU here, not on cuda"):
        check_precision("bf16", torch.device("cuda"))
    if bf16_unsupported_reason() is None:  # else the CPU is the first thing refused
        with pytest.raises(ConfigError, match="runs in the precision it was exported in"):
            load_embedder(tmp_path / "model.onnx", precision="bf16")
        with pytest.raises(ConfigError, match="bf16 runs with the PyTorch backend"):
            load_embedder("model.ckpt", backend="onnx", onnx_path="x.onnx", precision="bf16")


# Measured on this project's machines (AVX512-BF16): random-weight ERes2Net base 0.99999, the
# trained mini-recipe model >= 0.9995 over its 139 test recordings. bfloat16 keeps 8 bits of
# mantissa, so a cosine under 0.999 means something other than rounding went wrong.
BF16_MIN_COSINE = 0.999


@pytest.mark.slow
@pytest.mark.skipif(bf16_unsupported_reason() is not None, reason="CPU without bfloat16")
@pytest.mark.parametrize("name", ["eres2net", "campplus"])
def test_bf16_embeddings_are_close_to_fp32(name):
    model = reference_model(name)
    feats = torch.stack([speech_like_fbank(seed) for seed in range(3)])
    expected = plain(model, feats)
    embedder = TorchEmbedder(model, precision="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fold is checked in float32: it must hold
        actual = embedder(feats)
    assert any(isinstance(m, nn.Identity) for m in embedder.runner.modules())  # folded
    assert actual.dtype == np.float32 and np.all(np.isfinite(actual))
    assert cosines(actual, expected).min() >= BF16_MIN_COSINE
    assert 1.0 - cosines(actual, expected).min() > 1e-9  # bfloat16 really ran


@pytest.mark.slow
@pytest.mark.skipif(bf16_unsupported_reason() is not None, reason="CPU without bfloat16")
def test_identity_differs_by_precision():
    """Resume is keyed by the identity: bf16 work must never be taken for fp32 work."""
    model = reference_model("campplus")
    fp32, bf16 = TorchEmbedder(model), TorchEmbedder(model, precision="bf16")
    assert fp32.identity != bf16.identity
    assert TorchEmbedder(reference_model("campplus")).identity == fp32.identity


# --------------------------------------------------------------------------- int8


# Measured: ERes2Net base (random weights, trained-like batch norm) 0.9999 on held-out
# recordings; the trained mini-recipe model >= 0.99 on its 139 test recordings. A failed
# quantisation (wrong scales, a saturated layer) gives cosines far below 0.98.
INT8_MIN_COSINE = 0.98


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from speakerlab.onnx_export import export_onnx

    model = reference_model("eres2net")
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, path, metadata={"model_name": "eres2net", "threshold": 0.3})
    return model, path


@pytest.mark.slow
def test_int8_model_loads_and_is_close_to_fp32(exported, tmp_path):
    from speakerlab.quantize import quantize_onnx

    model, fp32_path = exported
    calibration = [speech_like_fbank(seed) for seed in range(6)]
    out, calibration_cosine = quantize_onnx(fp32_path, tmp_path / "model.int8.onnx", calibration)
    assert out.is_file() and calibration_cosine >= INT8_MIN_COSINE

    import onnx

    graph = onnx.load(str(out)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= sum(isinstance(m, nn.Conv2d) for m in model.modules())

    embedder, threshold = load_embedder(out)
    assert isinstance(embedder, OnnxEmbedder) and threshold == 0.3
    assert embedder.precision == "int8" and embedder.metadata["precision"] == "int8"
    float_embedder = OnnxEmbedder(fp32_path)
    assert float_embedder.precision == "fp32"
    assert embedder.identity.startswith("onnx:int8:")
    assert len({embedder.identity, float_embedder.identity, TorchEmbedder(model).identity}) == 3
    assert embedder.metadata["export_key"] != float_embedder.metadata["export_key"]
    assert embedder.metadata["model_name"] == "eres2net"
    assert embedder.metadata["threshold"] == 0.3
    held_out = torch.stack([speech_like_fbank(seed, 3.0) for seed in range(100, 104)])
    expected = plain(model, held_out)
    actual = embedder(held_out)
    assert np.all(np.isfinite(actual))
    assert cosines(actual, expected).min() >= INT8_MIN_COSINE
    assert cosines(actual, expected).min() < 0.999999  # it really is quantised

    with pytest.raises(ConfigError, match="already quantised"):
        quantize_onnx(out, tmp_path / "twice.onnx", calibration)


@pytest.mark.slow
def test_quantisation_below_the_bound_writes_nothing(exported, tmp_path):
    from speakerlab.quantize import quantize_onnx

    _, fp32_path = exported
    target = tmp_path / "model.int8.onnx"
    with pytest.raises(CheckpointError, match="nothing written"):
        quantize_onnx(fp32_path, target, [speech_like_fbank(0)], min_cosine=1.01)
    assert list(tmp_path.iterdir()) == []


def test_quantisation_input_errors(exported, tmp_path):
    from speakerlab.quantize import quantize_onnx

    _, fp32_path = exported
    with pytest.raises(ConfigError, match="at least one calibration"):
        quantize_onnx(fp32_path, tmp_path / "a.onnx", [])
    with pytest.raises(ConfigError, match="calibration item 0"):
        quantize_onnx(fp32_path, tmp_path / "a.onnx", [torch.full((50, 80), float("nan"))])
    with pytest.raises(ConfigError, match="must have 80 bins"):
        quantize_onnx(fp32_path, tmp_path / "a.onnx", [torch.zeros(50, 40)])
    with pytest.raises(CheckpointError, match="not found"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "a.onnx", [torch.zeros(50, 80)])
    assert list(tmp_path.iterdir()) == []


def test_calibration_features_spread_over_the_list(tmp_path):
    import soundfile

    from speakerlab.quantize import calibration_features

    lines = []
    for i in range(5):  # 1.0, 1.1, ... 1.4 s: 98, 108, ... 138 frames
        path = tmp_path / f"u{i}.wav"
        soundfile.write(path, np.full(16000 + 1600 * i, 0.1, dtype=np.float32), 16000)
        lines.append(f"u{i} {path}\n")
    (tmp_path / "wav.scp").write_text("".join(lines))
    feats = calibration_features(tmp_path / "wav.scp", count=3)
    assert [f.shape for f in feats] == [(98, 80), (118, 80), (138, 80)]
    assert len(calibration_features(tmp_path / "wav.scp", count=9)) == 5
    with pytest.raises(ConfigError, match=">= 1"):
        calibration_features(tmp_path / "wav.scp", count=0)


# --------------------------------------------------------------------------- commands


def write_wav(path: Path, seed: int, seconds: float = 2.0, rate: int = 16000) -> Path:
    import soundfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    wav = 0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    soundfile.write(path, wav.astype(np.float32), rate)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from speakerlab.models.checkpoint import save_embedding_model

    path = tmp_path_factory.mktemp("ckpt") / "eres2net.ckpt"
    save_embedding_model(reference_model("eres2net"), path)
    return path


@pytest.fixture(scope="module")
def calibration_scp(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("calibration")
    lines = [f"u{i} {write_wav(folder / f'u{i}.wav', i)}\n" for i in range(4)]
    (folder / "wav.scp").write_text("".join(lines))
    return folder / "wav.scp"


def cli_error(main, argv: list[str], capsys) -> str:
    """The one-line error a command printed before exiting with status 1."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("speakerlab ") and err.count("\n") == 1, err
    return err


@pytest.mark.slow
def test_export_onnx_quantize_int8_end_to_end(tiny_checkpoint, calibration_scp, tmp_path, capsys):
    from speakerlab.bin import export_onnx, verify

    out = tmp_path / "model.int8.onnx"
    export_onnx.main(
        ["--model", str(tiny_checkpoint), "--out", str(out), "--quantize", "int8"]
        + ["--calibration-scp", str(calibration_scp), "--calibration-utts", "3"]
    )
    printed = capsys.readouterr().out
    assert "ONNX Runtime matches PyTorch" in printed
    assert "wrote int8 model" in printed and "of 3 calibration recording(s)" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx"]  # no leftovers
    embedder = OnnxEmbedder(out)
    assert embedder.precision == "int8"
    feats = torch.stack([speech_like_fbank(seed) for seed in (7, 8)])
    assert cosines(embedder(feats), plain(reference_model("eres2net"), feats)).min() >= 0.98

    # A float export to the same path is not taken for the int8 file already there.
    export_onnx.main(["--model", str(tiny_checkpoint), "--out", str(out), "--no-check"])
    assert "exported" in capsys.readouterr().out
    assert OnnxEmbedder(out).precision == "fp32"

    wavs = [str(write_wav(tmp_path / f"{name}.wav", seed)) for name, seed in (("a", 1), ("b", 2))]
    export_onnx.main(
        ["--model", str(tiny_checkpoint), "--out", str(out), "--quantize", "int8"]
        + ["--calibration-scp", str(calibration_scp), "--no-check"]
    )
    capsys.readouterr()
    verify.main([*wavs, "--model", str(out), "--threshold", "0.5"])
    assert "score:" in capsys.readouterr().out


def test_export_onnx_quantize_input_errors(tiny_checkpoint, calibration_scp, tmp_path, capsys):
    from speakerlab.bin import export_onnx

    out = tmp_path / "out" / "model.int8.onnx"
    base = ["--model", str(tiny_checkpoint), "--out", str(out)]
    err = cli_error(export_onnx.main, [*base, "--quantize", "int8"], capsys)
    assert "--quantize int8 needs --calibration-scp" in err
    missing = tmp_path / "missing.scp"
    err = cli_error(
        export_onnx.main, [*base, "--quantize", "int8", "--calibration-scp", str(missing)], capsys
    )
    assert f"{missing}: calibration list not found" in err
    wrong_rate = write_wav(tmp_path / "8k.wav", 0, rate=8000)
    (tmp_path / "8k.scp").write_text(f"u {wrong_rate}\n")
    err = cli_error(
        export_onnx.main,
        [*base, "--quantize", "int8", "--calibration-scp", str(tmp_path / "8k.scp")],
        capsys,
    )
    assert f"{wrong_rate}: sample rate is 8000 Hz, expected 16000 Hz" in err
    err = cli_error(export_onnx.main, [*base, "--calibration-scp", str(calibration_scp)], capsys)
    assert "only used with --quantize int8" in err
    err = cli_error(
        export_onnx.main,
        ["--model", str(tiny_checkpoint), "--out", str(tmp_path / "m.bin")],
        capsys,
    )
    assert "must end in .onnx" in err
    assert not out.parent.exists()  # nothing written


@pytest.mark.slow
def test_verify_precision_bf16_from_the_command(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from speakerlab.bin import verify

    wavs = [str(write_wav(tmp_path / f"{name}.wav", seed)) for name, seed in (("a", 1), ("b", 2))]
    argv = [*wavs, "--model", str(tiny_checkpoint), "--threshold", "0.5", "--precision", "bf16"]
    if bf16_unsupported_reason() is None:
        verify.main(argv)
        bf16_score = float(capsys.readouterr().out.split()[1])
        verify.main(argv[:-2])
        fp32_score = float(capsys.readouterr().out.split()[1])
        assert abs(bf16_score - fp32_score) < 0.01
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    err = cli_error(verify.main, argv, capsys)
    assert "bf16 inference refused: this CPU has no bfloat16 instructions" in err


@pytest.mark.slow
@pytest.mark.skipif(bf16_unsupported_reason() is not None, reason="CPU without bfloat16")
def test_extraction_does_not_resume_fp32_work_in_bf16(tiny_checkpoint, calibration_scp, tmp_path):
    from speakerlab.embedding_store import read_embeddings
    from speakerlab.extract import extract_with_model

    def extract(out_dir: Path, precision: str) -> dict[str, np.ndarray]:
        scp = extract_with_model(
            tiny_checkpoint,
            calibration_scp,
            out_dir,
            backend="torch",
            precision=precision,
            progress=False,
        )
        return read_embeddings(scp)

    fp32 = extract(tmp_path / "shared", "fp32")
    bf16_resumed = extract(tmp_path / "shared", "bf16")
    bf16_fresh = extract(tmp_path / "fresh", "bf16")
    for key in fp32:
        np.testing.assert_array_equal(bf16_resumed[key], bf16_fresh[key])
        assert not np.array_equal(bf16_resumed[key], fp32[key])
