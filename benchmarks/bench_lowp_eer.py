"""Accuracy of low-precision inference: EER of a trained model in fp32, int8 and bf16.

For a trained embedding model (e.g. the mini recipe's ``exp/eres2net_mini/model.ckpt``) it
embeds the test set of a prepared 3D-Speaker-layout data folder with

* ``fp32``: the plain PyTorch model (the reference),
* ``torch fp32``: :class:`speakerlab.embedder.TorchEmbedder` on the CPU (batch norms folded,
  channels-last; must equal the reference to float rounding),
* ``onnx fp32``: the exported ONNX model with ONNX Runtime,
* ``int8``: that model quantised by :func:`speakerlab.quantize.quantize_onnx`, calibrated on
  utterances of the training set (never the test set),
* ``bf16``: ``TorchEmbedder(model, precision="bf16")`` (skipped, and said so, on CPUs without
  bfloat16 instructions),

scores every trial list with ``speakerlab score`` and prints, per precision, the EER and minDCF of
each list, the relative EER change against fp32 and the cosine similarity of each utterance's
embedding to its fp32 embedding (min and mean), as JSON.

    cd egs/3dspeaker/sv-eres2net
    python ../../../benchmarks/bench_lowp_eer.py --model exp/eres2net_mini/model.ckpt \\
        --data data/3dspeaker --out-dir /tmp/lowp_eer
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from speakerlab.cpu_inference import bf16_unsupported_reason
from speakerlab.embedder import Embedder, OnnxEmbedder, TorchEmbedder
from speakerlab.embedding_store import read_embeddings
from speakerlab.extract import extract_embeddings
from speakerlab.onnx_export import export_onnx
from speakerlab.pretrained import load_model
from speakerlab.quantize import calibration_features, quantize_onnx

TRIAL_LISTS = ("trials_cross_device", "trials_cross_distance", "trials_cross_dialect")


class PlainEmbedder(Embedder):
    """The model as it is (no preparation), in float32: the reference."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.feat_dim = int(getattr(model, "feat_dim", 80))

    def embed_features(self, feats: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.model(feats).numpy()

    @property
    def identity(self) -> str:
        return "plain"


def score(scp: Path, trials: list[Path], out_dir: Path) -> dict[str, dict]:
    """``speakerlab score`` on ``scp``: {trial list: {eer_percent, min_dcf}}."""
    subprocess.run(
        [
            *(sys.executable, "-m", "speakerlab", "score", "--embeddings", str(scp)),
            *("--trials", *map(str, trials), "--out-dir", str(out_dir)),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    results = json.loads((out_dir / "results.json").read_text())["results"]
    return {
        r["trials"]: {"eer_percent": r["eer_percent"], "min_dcf": r["min_dcf"]} for r in results
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="trained embedding-model checkpoint")
    parser.add_argument("--data", required=True, help="prepared folder (train/, test/, trials/)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--calibration-utts", type=int, default=16)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out_dir)
    trials = [data / "trials" / name for name in TRIAL_LISTS]
    test_scp = data / "test" / "wav.scp"

    loaded = load_model(args.model)
    onnx_path = export_onnx(loaded.model, out / "model.onnx")
    int8_path, calibration_cosine = quantize_onnx(
        onnx_path,
        out / "model.int8.onnx",
        calibration_features(data / "train" / "wav.scp", args.calibration_utts),
    )
    embedders = {
        "fp32": lambda: PlainEmbedder(loaded.model),
        "torch fp32": lambda: TorchEmbedder(loaded.model),
        "onnx fp32": lambda: OnnxEmbedder(onnx_path),
        "int8": lambda: OnnxEmbedder(int8_path),
        "bf16": lambda: TorchEmbedder(loaded.model, precision="bf16"),
    }
    skipped = {}
    if bf16_unsupported_reason() is not None:
        skipped["bf16"] = bf16_unsupported_reason()
        del embedders["bf16"]

    rows, reference = {}, None
    for name, make in embedders.items():
        folder = out / name.replace(" ", "_")
        scp = extract_embeddings(test_scp, make(), folder / "embeddings", progress=False)
        vectors = read_embeddings(scp)
        if reference is None:
            reference = vectors
        a = np.stack([vectors[k] for k in reference])
        b = np.stack(list(reference.values()))
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        rows[name] = {
            "cosine_to_fp32": {"min": float(cos.min()), "mean": float(cos.mean())},
            "trials": score(scp, trials, folder / "scores"),
        }
    for row in rows.values():
        for trial, result in row["trials"].items():
            base = rows["fp32"]["trials"][trial]["eer_percent"]
            result["eer_change_relative"] = (result["eer_percent"] - base) / base
    summary = {
        "model": args.model,
        "int8_calibration": {"utterances": args.calibration_utts, "min_cosine": calibration_cosine},
        "skipped": skipped,
        "precisions": rows,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
