"""``speakerlab export-onnx``: export an embedding model to ONNX (dynamic batch and frame axes).

The exported file takes fbank ``feats`` (batch, frames, feat_dim) and returns ``embedding``;
``speakerlab extract/verify/embed --model file.onnx`` run it with ONNX Runtime. After export the
ONNX and PyTorch embeddings of random inputs of two lengths and batch sizes are compared; the
export fails if their cosine similarity is below 0.9999. A file that already holds an export of
the same weights, opset and metadata is kept as it is (``--force`` exports anyway).
"""

from __future__ import annotations

import argparse

from speakerlab.bin import exits_on_error
from speakerlab.errors import CheckpointError
from speakerlab.onnx_export import (
    DEFAULT_OPSET,
    export_onnx,
    export_onnx_if_changed,
    onnx_parity,
)

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
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from speakerlab.pretrained import load_model

    loaded = load_model(args.model)
    metadata = {"model_name": loaded.name, "model_kwargs": loaded.kwargs, "source": loaded.source}
    if loaded.threshold is not None:
        metadata["threshold"] = loaded.threshold
    if args.force:
        export_onnx(loaded.model, args.out, opset=args.opset, metadata=metadata)
        exported = True
    else:
        exported = export_onnx_if_changed(
            loaded.model, args.out, opset=args.opset, metadata=metadata
        )
    path = args.out
    if exported:
        print(f"exported {loaded.name} to {path}")
    else:
        print(f"{path} already holds this export of {loaded.name} (same weights): kept")
    if not args.no_check:
        cosine = onnx_parity(loaded.model, path)
        if cosine < MIN_COSINE:
            raise CheckpointError(
                f"{path}: ONNX Runtime embeddings differ from PyTorch "
                f"(cosine {cosine:.6f} < {MIN_COSINE})"
            )
        print(f"ONNX Runtime matches PyTorch: smallest cosine similarity {cosine:.7f}")


@exits_on_error("export-onnx")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
