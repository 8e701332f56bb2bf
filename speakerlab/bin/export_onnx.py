"""``speakerlab export-onnx``: export an embedding model to ONNX (dynamic batch and frame axes).

The exported file takes fbank ``feats`` (batch, frames, feat_dim) and returns ``embedding``;
``speakerlab extract/verify/embed --model file.onnx`` run it with ONNX Runtime. After export the
ONNX and PyTorch embeddings of random inputs of two lengths and batch sizes are compared; the
export fails if their cosine similarity is below 0.9999. A file that already holds an export of
the same weights, opset and metadata is kept as it is (``--force`` exports anyway).

``--quantize int8`` writes an int8 model instead (ONNX Runtime static quantisation: int8 weights
per output channel, activation ranges measured on --calibration-utts recordings of
--calibration-scp, ideally training data of many speakers, never the test set). It is written
only when its embeddings of those recordings are within cosine similarity 0.95 of the float
model's; the command prints the smallest one. int8 changes scores slightly: check the EER of your
trials with it before deploying it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from speakerlab.bin import exits_on_error
from speakerlab.errors import CheckpointError, ConfigError
from speakerlab.onnx_export import (
    DEFAULT_OPSET,
    export_onnx,
    export_onnx_if_changed,
    onnx_parity,
)
from speakerlab.quantize import DEFAULT_CALIBRATION_UTTS

MIN_COSINE = 0.9999


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="speakerlab export-onnx",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="registry id or checkpoint file")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)"
    )
    parser.add_argument(
        "--no-check", action="store_true", help="skip the ONNX Runtime vs PyTorch comparison"
    )
    parser.add_argument(
        "--force", action="store_true", help="export even if --out holds this export already"
    )
    parser.add_argument(
        "--quantize", choices=("int8",), help="write an int8 model (needs --calibration-scp)"
    )
    parser.add_argument(
        "--calibration-scp",
        help="'utt path' list of 16 kHz recordings to calibrate the int8 activations on",
    )
    parser.add_argument(
        "--calibration-utts",
        type=int,
        default=DEFAULT_CALIBRATION_UTTS,
        help="recordings of --calibration-scp used, spread over the list (default %(default)s)",
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse inconsistent options before anything is loaded or written."""
    if args.quantize and not args.calibration_scp:
        raise ConfigError(
            "--quantize int8 needs --calibration-scp: a few recordings to measure the "
            "activation ranges on"
        )
    if args.calibration_scp and not args.quantize:
        raise ConfigError("--calibration-scp is only used with --quantize int8")
    if not str(args.out).endswith(".onnx"):
        raise ConfigError(f"--out {args.out}: the file name must end in .onnx")


def run(args: argparse.Namespace) -> None:
    from speakerlab.pretrained import load_model

    check_args(args)
    calibration = None
    if args.quantize:  # read and check the recordings before any output is touched
        from speakerlab.quantize import calibration_features

        calibration = calibration_features(args.calibration_scp, args.calibration_utts)
    loaded = load_model(args.model)
    metadata = {"model_name": loaded.name, "model_kwargs": loaded.kwargs, "source": loaded.source}
    if loaded.threshold is not None:
        metadata["threshold"] = loaded.threshold
    if args.quantize:
        with tempfile.TemporaryDirectory() as scratch:
            float_path = Path(scratch) / "float.onnx"
            export_onnx(loaded.model, float_path, opset=args.opset, metadata=metadata)
            if not args.no_check:
                check_parity(loaded.model, float_path)
            quantize_int8(float_path, args.out, calibration)
        return
    if args.force:
        export_onnx(loaded.model, args.out, opset=args.opset, metadata=metadata)
        exported = True
    else:
        exported = export_onnx_if_changed(
            loaded.model, args.out, opset=args.opset, metadata=metadata
        )
    if exported:
        print(f"exported {loaded.name} to {args.out}")
    else:
        print(f"{args.out} already holds this export of {loaded.name} (same weights): kept")
    if not args.no_check:
        check_parity(loaded.model, args.out)


def check_parity(model, path: str | Path) -> None:
    cosine = onnx_parity(model, path)
    if not cosine >= MIN_COSINE:
        raise CheckpointError(
            f"{path}: ONNX Runtime embeddings differ from PyTorch "
            f"(cosine {cosine:.6f} < {MIN_COSINE})"
        )
    print(f"ONNX Runtime matches PyTorch: smallest cosine similarity {cosine:.7f}")


def quantize_int8(float_path: Path, out: str | Path, calibration) -> None:
    from speakerlab.quantize import quantize_onnx

    path, cosine = quantize_onnx(float_path, out, calibration)
    print(
        f"wrote int8 model {path}: smallest cosine similarity to the float embeddings of "
        f"{len(calibration)} calibration recording(s) {cosine:.4f}"
    )


@exits_on_error("export-onnx")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
