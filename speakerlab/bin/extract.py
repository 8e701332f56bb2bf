"""``speakerlab extract``: embed each utterance of a wav.scp into ``<out-dir>/embedding.{ark,scp}``.

Utterances are embedded whole, batched by equal frame count, and the run resumes where an
interrupted one stopped. Run under ``torchrun --nproc_per_node N`` to split the work over N
processes (GPUs when present); rank 0 merges the parts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from speakerlab.bin import exits_on_error
from speakerlab.distributed import DistContext, barrier, init_distributed
from speakerlab.errors import ConfigError
from speakerlab.extract import Embedder, extract_embeddings

EXTRACT_TIMEOUT_MINUTES = 48 * 60


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="speakerlab extract",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="registry id, checkpoint file (ours or released) or .onnx file",
    )
    parser.add_argument("--wav-scp", required=True, help="'utt path' list of 16 kHz recordings")
    parser.add_argument("--out-dir", required=True, help="where embedding.{ark,scp} go")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="most utterances (of equal length) per batch (default %(default)s)",
    )
    parser.add_argument(
        "--max-batch-frames",
        type=int,
        default=16000,
        help="most fbank frames per batch (default %(default)s = 160 s)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="processes reading audio and computing fbank (default %(default)s)",
    )
    parser.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="onnx: ONNX Runtime on the CPU, the model exported to "
        "<out-dir>/model.onnx first (1.2x the speed of PyTorch there, same "
        "embeddings to 1e-6); torch: PyTorch; auto (default): onnx on the CPU, "
        "torch on a GPU",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (this rank's GPU if any, else CPU), cpu, cuda, cuda:N",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def model_tag(source: str) -> str:
    """What identifies the model in the output directory: a file's absolute path or the id."""
    path = Path(source)
    return str(path.resolve()) if path.is_file() else source


def choose_backend(backend: str, device: torch.device) -> str:
    """``auto``: ONNX Runtime when extraction runs on the CPU, PyTorch on a GPU."""
    if backend != "auto":
        return backend
    return "onnx" if device.type == "cpu" else "torch"


def build_embedder(args: argparse.Namespace, ranks: DistContext) -> Embedder:
    """The PyTorch model, or ONNX Runtime on a given .onnx file or on an export of the model
    that rank 0 writes to ``<out-dir>/model.onnx`` (ONNX Runtime is faster on the CPU)."""
    from speakerlab.inference import load_embedder

    backend = choose_backend(args.backend, ranks.device)
    if backend == "torch" or args.model.endswith(".onnx"):
        return load_embedder(args.model, ranks.device)[0]
    from speakerlab.onnx_export import OnnxEmbedder, export_onnx
    from speakerlab.pretrained import load_model

    if ranks.device.type != "cpu":
        raise ConfigError("--backend onnx runs on the CPU; use --device cpu")
    onnx_path = Path(args.out_dir) / "model.onnx"
    if ranks.is_main:  # always: a file left there by another model must not be used
        loaded = load_model(args.model)
        export_onnx(
            loaded.model,
            onnx_path,
            metadata={
                "model_name": loaded.name,
                "model_kwargs": loaded.kwargs,
                "source": loaded.source,
            },
        )
    barrier(ranks)
    return OnnxEmbedder(onnx_path, num_threads=torch.get_num_threads())


def run(args: argparse.Namespace) -> None:
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    # Ranks wait for each other at the end, possibly for hours: a long collective timeout.
    ranks = init_distributed(
        args.device, EXTRACT_TIMEOUT_MINUTES, backend="gloo", option="--device"
    )
    embedder = build_embedder(args, ranks)
    scp = extract_embeddings(
        args.wav_scp,
        embedder,
        args.out_dir,
        batch_size=args.batch_size,
        max_batch_frames=args.max_batch_frames,
        num_workers=args.num_workers,
        ranks=ranks,
        progress=not args.no_progress,
        model_tag=model_tag(args.model),
    )
    if ranks.is_main:
        print(f"embeddings: {scp}")


@exits_on_error("extract")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
