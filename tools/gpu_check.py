#!/usr/bin/env python3
"""The measuring parts of tools/gpu_check.sh: each subcommand prints one result line (the shell
script appends it to the summary) and exits non-zero when its check fails.

    throughput   steady-state figures of a training run from its TensorBoard scalars
    long-utts    a wav.scp of utterances of N seconds, tiled from shorter recordings
    base-model   a freshly initialised ERes2Net base saved as a plain state dict
    cosines      lowest cosine between the embeddings of two extractions
    restart      kill a training run after a mid-epoch checkpoint, restart it, compare
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def throughput(args: argparse.Namespace) -> int:
    """Samples/s, data wait and peak memory over the windows after ``--warmup`` steps, and the
    mean GPU utilisation sampled by nvidia-smi (if a file of samples is given)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(args.tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    rates = [(e.step, e.value) for e in events.Scalars("train/samples_per_second")]
    waits = dict((e.step, e.value) for e in events.Scalars("train/data_wait_fraction"))
    memory = []
    if "train/peak_memory_gib" in tags:
        memory = [e.value for e in events.Scalars("train/peak_memory_gib")]
    samples = seconds = waited = 0.0
    previous = 0
    for step, rate in rates:
        if previous >= args.warmup:  # the window (previous, step] lies after the warm-up
            window_samples = (step - previous) * args.global_batch
            window_seconds = window_samples / rate
            samples, seconds = samples + window_samples, seconds + window_seconds
            waited += waits[step] * window_seconds
        previous = step
    if not seconds:
        print(f"{args.label}: no iterations after the {args.warmup} warm-up steps")
        return 1
    parts = [
        f"{samples / seconds:.1f} samples/s",
        f"data wait {100 * waited / seconds:.1f} %",
        f"{int(samples / args.global_batch)} iterations timed after {args.warmup}",
    ]
    if memory:
        parts.append(f"peak memory {max(memory):.1f} GiB")
    if args.gpu_busy and Path(args.gpu_busy).is_file():
        busy = [float(v) for v in Path(args.gpu_busy).read_text().split() if v.strip()]
        busy = busy[next((i for i, v in enumerate(busy) if v > 0), len(busy)) :]
        if busy:
            parts.append(f"GPU busy {np.mean(busy):.0f} % (nvidia-smi, {len(busy)} samples)")
    print(f"{args.label}: " + ", ".join(parts))
    return 0


def long_utts(args: argparse.Namespace) -> int:
    """Utterances of exactly ``--seconds`` seconds, each the tiling of one recording."""
    import soundfile

    out = Path(args.out)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    sources = [line.split(maxsplit=1) for line in Path(args.wav_scp).read_text().splitlines()]
    lines = []
    for i in range(args.count):
        utt, path = sources[i % len(sources)]
        audio, rate = soundfile.read(path.strip(), dtype="float32")
        length = int(args.seconds * rate)
        tiled = np.tile(audio, -(-length // len(audio)))[:length]
        target = out / "wav" / f"long{i:05d}.wav"
        soundfile.write(target, tiled, rate)
        lines.append(f"long{i:05d} {target}")
    (out / "wav.scp").write_text("\n".join(lines) + "\n")
    (out / "subset.scp").write_text("\n".join(lines[: args.subset]) + "\n")
    print(f"{args.count} utterances of {args.seconds:g} s in {out / 'wav.scp'}")
    return 0


def base_model(args: argparse.Namespace) -> int:
    import torch

    from speakerlab.models import build_model
    from speakerlab.models.checkpoint import save_embedding_model

    torch.manual_seed(0)
    save_embedding_model(build_model("eres2net"), args.out)
    print(f"ERes2Net base (fresh weights) in {args.out}")
    return 0


def cosines(args: argparse.Namespace) -> int:
    """The lowest cosine between embeddings of the same utterances in two extractions."""
    import kaldiio

    a, b = dict(kaldiio.load_scp(args.a)), dict(kaldiio.load_scp(args.b))
    common = sorted(set(a) & set(b))
    if not common:
        print(f"{args.label}: no utterance in both {args.a} and {args.b}")
        return 1
    x = np.stack([a[k] for k in common]).astype(np.float64)
    y = np.stack([b[k] for k in common]).astype(np.float64)
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    verdict = "ok" if cos.min() >= args.minimum else f"FAILED (below {args.minimum})"
    print(f"{args.label}: lowest cosine {cos.min():.6f} over {len(common)} utterances, {verdict}")
    return 0 if cos.min() >= args.minimum else 1


def restart(args: argparse.Namespace) -> int:
    """Train uninterrupted; train again, SIGKILL after the first mid-epoch checkpoint, restart
    with the same command; the final weights must be identical."""
    import torch

    from speakerlab.training.checkpointing import checkpoint_step, list_checkpoints

    def command(exp_dir: Path) -> list[str]:
        return [sys.executable, "-m", "speakerlab", "train", f"exp_dir={exp_dir}", *args.train]

    out = Path(args.out)
    reference, killed = out / "uninterrupted", out / "killed"
    subprocess.run(command(reference), check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    final = torch.load(list_checkpoints(reference / "checkpoints")[-1], weights_only=True)
    per_epoch = int(final["global_step"]) // args.epochs
    process = subprocess.Popen(command(killed), cwd=REPO, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline and process.poll() is None:
        steps = [checkpoint_step(p) for p in list_checkpoints(killed / "checkpoints")]
        if any(step % per_epoch for step in steps):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if process.returncode != -signal.SIGKILL:
        print(f"{args.label}: the run ended (status {process.returncode}) before it was killed")
        return 1
    at = max(checkpoint_step(p) for p in list_checkpoints(killed / "checkpoints"))
    subprocess.run(command(killed), check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    a = torch.load(list_checkpoints(reference / "checkpoints")[-1], weights_only=True)
    b = torch.load(list_checkpoints(killed / "checkpoints")[-1], weights_only=True)
    same = all(
        torch.equal(a[part][k], b[part][k]) for part in ("model", "classifier") for k in a[part]
    )
    verdict = "identical" if same else "DIFFERENT"
    print(
        f"{args.label}: killed after step {at} of {a['global_step']}, restarted; final weights "
        f"{verdict} to the uninterrupted run's"
    )
    return 0 if same else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("throughput")
    p.add_argument("--tensorboard", required=True)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--gpu-busy", default=None, help="file of nvidia-smi utilisation samples")
    p.add_argument("--label", required=True)
    p = commands.add_parser("long-utts")
    p.add_argument("--wav-scp", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--subset", type=int, default=32, help="utterances also listed in subset.scp")
    p = commands.add_parser("base-model")
    p.add_argument("--out", required=True)
    p = commands.add_parser("cosines")
    p.add_argument("--a", required=True)
    p.add_argument("--b", required=True)
    p.add_argument("--minimum", type=float, default=0.9999)
    p.add_argument("--label", required=True)
    p = commands.add_parser("restart")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, required=True, help="trainer.epochs of the run")
    p.add_argument("--wait", type=float, default=120.0)
    p.add_argument("--label", required=True)
    p.add_argument("train", nargs="+", help="speakerlab train overrides (after --)")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return {
        "throughput": throughput,
        "long-utts": long_utts,
        "base-model": base_model,
        "cosines": cosines,
        "restart": restart,
    }[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
