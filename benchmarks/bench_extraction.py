"""Extraction speed: real-time factor of embedding extraction on the CPU.

Compares, on the same synthetic recordings and the same model (random weights with trained-like
batch-norm statistics; speed does not depend on the weights):

* ``plain loop``: the baseline -- read, fbank and embed one utterance at a time with PyTorch;
* ``extract torch bs=1`` / ``extract torch bs=N``: ``speakerlab.extract`` with the PyTorch backend;
* ``extract onnx bs=1`` / ``extract onnx bs=N``: the same with the ONNX Runtime backend;
* ``... R ranks x 1 thread``: extraction split over R processes of one thread each, as
  ``torchrun --nproc_per_node R -m speakerlab extract`` runs it (timed after start-up).

For each it prints the real-time factor (processing seconds per second of audio), the speed-up
over the plain loop and how far its embeddings are from the plain loop's (largest absolute
difference and smallest cosine similarity).

    python benchmarks/bench_extraction.py --num-utts 16 --seconds 8 --model eres2net
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from speakerlab.audio import load_audio
from speakerlab.distributed import DistContext
from speakerlab.embedder import DEFAULT_MAX_BATCH_FRAMES, OnnxEmbedder, TorchEmbedder
from speakerlab.embedding_store import read_embeddings
from speakerlab.extract import extract_embeddings
from speakerlab.features import fbank
from speakerlab.models import build_model
from speakerlab.onnx_export import export_onnx

MODELS = {
    "eres2net": dict(m_channels=32, embedding_size=512),  # ERes2Net base (released)
    "eres2net_large": dict(m_channels=64, embedding_size=512),
    "campplus": dict(embedding_size=192),
    "ecapa_tdnn": dict(channels=[1024, 1024, 1024, 1024, 3072], embedding_size=192),
    "eres2netv2": dict(embedding_size=192),
}


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name.removesuffix("_large"), **MODELS[name])
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def make_recordings(directory: Path, count: int, seconds: float) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        path = directory / f"utt{i:04d}.wav"
        t = np.arange(int(seconds * 16000)) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (120 + 7 * i) * t) + 0.05 * rng.standard_normal(t.size)
        soundfile.write(path, wav.astype(np.float32), 16000)
        lines.append(f"utt{i:04d} {path}\n")
    scp = directory / "wav.scp"
    scp.write_text("".join(lines))
    return scp


def plain_loop(model: torch.nn.Module, wav_scp: Path) -> dict[str, np.ndarray]:
    """The baseline: one utterance at a time, nothing batched."""
    out = {}
    with torch.no_grad():
        for line in wav_scp.read_text().splitlines():
            utt, path = line.split()
            feats = fbank(load_audio(path)).unsqueeze(0)
            out[utt] = model(feats)[0].numpy()
    return out


def _rank_worker(
    rank: int,
    world_size: int,
    port: int,
    wav_scp: str,
    model_source: str,
    out_dir: str,
    batch_size: int,
    max_batch_frames: int,
    times: torch.multiprocessing.Queue,
) -> None:
    """One of ``world_size`` extraction ranks with one thread each (what torchrun starts)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    if model_source.endswith(".onnx"):
        embedder = OnnxEmbedder(model_source, num_threads=1)
    else:
        embedder = TorchEmbedder(torch.load(model_source, weights_only=False))
    embedder(torch.randn(1, 300, 80))  # warm-up
    dist.barrier()  # time the extraction only, not process start-up
    start = time.perf_counter()
    extract_embeddings(
        wav_scp,
        embedder,
        out_dir,
        batch_size=batch_size,
        max_batch_frames=max_batch_frames,
        ranks=DistContext(rank, world_size, 0, torch.device("cpu"), "gloo"),
        progress=False,
    )
    if rank == 0:
        times.put(time.perf_counter() - start)
    dist.destroy_process_group()


def extract_on_ranks(
    world_size: int,
    wav_scp: Path,
    model_source: Path,
    out_dir: Path,
    batch_size: int,
    max_batch_frames: int,
) -> float:
    """Wall time of a ``world_size``-rank extraction (ranks started beforehand)."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    times = context.Queue()
    mp.spawn(
        _rank_worker,
        args=(
            world_size,
            port,
            str(wav_scp),
            str(model_source),
            str(out_dir),
            batch_size,
            max_batch_frames,
            times,
        ),
        nprocs=world_size,
    )
    return times.get()


def compare(result: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> tuple[float, float]:
    a = np.stack([result[k] for k in reference])
    b = np.stack(list(reference.values()))
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.abs(a - b).max()), float(cos.min())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="eres2net", choices=list(MODELS))
    parser.add_argument("--num-utts", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--max-batch-frames",
        type=int,
        default=DEFAULT_MAX_BATCH_FRAMES,
        help="fbank frames per model call (default %(default)s)",
    )
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    parser.add_argument(
        "--ranks",
        type=int,
        default=2,
        help="also time extraction on this many processes of one thread each "
        "(as under torchrun); 1 turns it off",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = make_model(args.model)
    audio_seconds = args.num_utts * args.seconds
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wav_scp = make_recordings(tmp, args.num_utts, args.seconds)
        onnx_path = export_onnx(model, tmp / "model.onnx")
        torch_embedder = TorchEmbedder(model)
        onnx_embedder = OnnxEmbedder(onnx_path, num_threads=args.threads)
        # Warm up both backends (first-call allocation and kernel selection).
        warm = torch.randn(1, int(args.seconds * 100) - 2, 80)
        torch_embedder(warm)
        onnx_embedder(warm)

        counter = iter(range(10**6))

        def extract_here(embedder, batch_size):
            out_dir = tmp / f"run_{next(counter)}"
            start = time.perf_counter()
            scp = extract_embeddings(
                wav_scp,
                embedder,
                out_dir,
                batch_size=batch_size,
                max_batch_frames=args.max_batch_frames,
                num_workers=args.num_workers,
                progress=False,
            )
            return time.perf_counter() - start, read_embeddings(scp)

        def extract_ranks(source):
            out_dir = tmp / f"run_{next(counter)}"
            seconds = extract_on_ranks(
                args.ranks, wav_scp, source, out_dir, args.batch_size, args.max_batch_frames
            )
            return seconds, read_embeddings(out_dir / "embedding.scp")

        def plain():
            start = time.perf_counter()
            result = plain_loop(model, wav_scp)
            return time.perf_counter() - start, result

        methods = {"plain loop (PyTorch, one at a time)": plain}
        for backend, embedder in (("torch", torch_embedder), ("onnx", onnx_embedder)):
            for batch_size in (1, args.batch_size):
                methods[f"extract {backend} bs={batch_size}"] = lambda e=embedder, b=batch_size: (
                    extract_here(e, b)
                )
        if args.ranks > 1:
            pickled = tmp / "model.pt"
            torch.save(model, pickled)
            for backend, source in (("torch", pickled), ("onnx", onnx_path)):
                methods[
                    f"extract {backend} bs={args.batch_size}, {args.ranks} ranks x 1 thread"
                ] = lambda s=source: extract_ranks(s)

        # Methods take turns in every repeat, so a change of machine load hits all of them.
        best: dict[str, tuple[float, dict]] = {}
        for _ in range(args.repeats):
            for name, method in methods.items():
                seconds, result = method()
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, result)
        baseline_time, reference = best["plain loop (PyTorch, one at a time)"]
        rows = [
            (name, seconds, *compare(result, reference)) for name, (seconds, result) in best.items()
        ]

    load = os.getloadavg()[0]
    print(
        f"model {args.model}, {args.num_utts} x {args.seconds:g} s, torch threads "
        f"{torch.get_num_threads()}, load average at end {load:.2f}"
    )
    print(f"{'method':40s} {'RTF':>8s} {'speed-up':>9s} {'max |diff|':>11s} {'min cos':>10s}")
    results = []
    for name, seconds, diff, cos in rows:
        rtf = seconds / audio_seconds
        print(f"{name:40s} {rtf:8.4f} {baseline_time / seconds:8.2f}x {diff:11.2e} {cos:10.7f}")
        results.append(
            {
                "method": name,
                "seconds": seconds,
                "rtf": rtf,
                "speedup": baseline_time / seconds,
                "max_abs_diff": diff,
                "min_cosine": cos,
            }
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "model": args.model,
                    "num_utts": args.num_utts,
                    "seconds": args.seconds,
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
