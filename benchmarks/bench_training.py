#!/usr/bin/env python3
"""Training throughput of ERes2Net base on CPU: one process and two gloo processes.

Runs the real entry point (``speakerlab train experiment=eres2net``: on-the-fly fbank, speed
perturbation, augmentation, the default data workers) for a few iterations and reads the per-
iteration TensorBoard scalars the trainer writes (``train/samples_per_second``,
``train/data_wait_fraction``; ``log_every_steps=1``). The first ``--warmup`` iterations (worker
start-up, allocator warm-up) are left out. Reported:

* throughput in 3 s training samples per second (all processes together);
* the share of iteration time rank 0 spent waiting for its next batch (goal: under 5 %).

Example (the mini corpus prepared by the recipe's data stage)::

    python benchmarks/bench_training.py --train_dir data/mini/3dspeaker/train \\
        --noise_list data/mini/musan/wav.scp --rir_list data/mini/rirs/wav.scp
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_command(processes: int, args: argparse.Namespace, exp_dir: Path) -> list[str]:
    """The ``speakerlab train`` command of one benchmark run."""
    launcher = (
        [sys.executable, "-m", "speakerlab"]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "speakerlab",
        ]
    )
    overrides = [
        "experiment=eres2net",
        f"exp_dir={exp_dir}",
        f"data.train_dir={args.train_dir}",
        f"data.index={exp_dir.parent / 'train_index.tsv'}",
        f"data.num_workers={args.workers}",
        f"trainer.batch_size={args.batch_size}",
        "trainer.epochs=1",
        f"trainer.max_steps_per_epoch={args.steps + args.warmup}",
        "trainer.device=cpu",
        f"trainer.num_threads={max(1, args.threads // processes)}",
        "trainer.log_every_steps=1",
        "trainer.progress_bar=false",
        "trainer.save_every_epochs=0",
        "trainer.save_every_minutes=0",
        "trainer.resume=false",
    ]
    if args.noise_list:
        overrides.append(f"data.noise_list={args.noise_list}")
    if args.rir_list:
        overrides.append(f"data.rir_list={args.rir_list}")
    return [*launcher, "train", *overrides]


def read_step_scalars(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The ``train/*`` scalars of a run as {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith("train/")
    }


def summarise(scalars: dict[str, list[tuple[int, float]]], batch_size: int, warmup: int) -> dict:
    """Throughput and data-wait share over the iterations after the warm-up."""
    rates = {step: value for step, value in scalars["train/samples_per_second"] if step > warmup}
    waits = {step: value for step, value in scalars["train/data_wait_fraction"] if step > warmup}
    seconds = {step: batch_size / rate for step, rate in rates.items()}  # iteration wall time
    total = sum(seconds.values())
    return {
        "iterations": len(seconds),
        "samples_per_second": batch_size * len(seconds) / total,
        "seconds_per_iteration": total / len(seconds),
        "data_wait_share": sum(waits[s] * seconds[s] for s in seconds) / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_dir", required=True, help="Kaldi training dir (wav.scp, utt2spk)")
    parser.add_argument("--noise_list", default=None)
    parser.add_argument("--rir_list", default=None)
    parser.add_argument("--batch_size", type=int, default=8, help="global batch (default 8 on CPU)")
    parser.add_argument("--steps", type=int, default=4, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first iterations")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data workers per process (default: the config's data.num_workers)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads shared by the processes",
    )
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.workers is None:
        from omegaconf import OmegaConf

        args.workers = int(OmegaConf.load(REPO / "conf" / "data" / "default.yaml").num_workers)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        for processes in args.processes:
            exp_dir = Path(tmp) / f"p{processes}"
            command = train_command(processes, args, exp_dir)
            print("+", " ".join(command), flush=True)
            subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
            summary = summarise(
                read_step_scalars(exp_dir / "tensorboard"), args.batch_size, args.warmup
            )
            results.append(
                {
                    "processes": processes,
                    "batch_size": args.batch_size,
                    "workers_per_process": args.workers,
                    "threads_per_process": max(1, args.threads // processes),
                    **summary,
                }
            )

    print(
        f"\nERes2Net base (m32, emb 192), 3 s crops, CPU, {os.cpu_count()} cores, global batch "
        f"{args.batch_size}, {args.workers} data workers per process"
    )
    print("| processes | threads/process | samples/s | s/iteration | data wait |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['processes']} | {r['threads_per_process']} | {r['samples_per_second']:.2f} | "
            f"{r['seconds_per_iteration']:.2f} | {100 * r['data_wait_share']:.1f} % |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
