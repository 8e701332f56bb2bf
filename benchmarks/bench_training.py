#!/usr/bin/env python3
"""Training throughput of ERes2Net base: the real pipeline (CPU, one and two gloo processes) or
the training step alone on synthetic batches (``--synthetic``, any device).

Pipeline mode runs the real entry point (``speakerlab train experiment=eres2net``: on-the-fly
fbank, speed perturbation, augmentation, the default data workers) for a few iterations and reads
the per-iteration TensorBoard scalars the trainer writes (``train/samples_per_second``,
``train/data_wait_fraction``; ``log_every_steps=1``). The first ``--warmup`` iterations (worker
start-up, allocator warm-up) are left out. Reported:

* throughput in 3 s training samples per second (all processes together);
* the share of iteration time rank 0 spent waiting for its next batch (goal: under 5 %).

Synthetic mode runs the trainer's own optimizer step (``Trainer._train_step``: forward, loss,
backward, finiteness check, optimizer step, statistics) on random fbank batches already on the
device, so no data loading limits it: the model's ceiling. It reports samples/s, the model's
FLOPs per step (``torch.utils.flop_counter``, forward and backward), the bf16 matrix-product
rate measured in the same process, their ratio, the peak memory and, on a GPU, how many times the
host waited for the device during the timed steps (``torch.cuda.set_sync_debug_mode``).

Examples (the mini corpus prepared by the recipe's data stage)::

    python benchmarks/bench_training.py --train_dir data/mini/3dspeaker/train \\
        --noise_list data/mini/musan/wav.scp --rir_list data/mini/rirs/wav.scp
    python benchmarks/bench_training.py --synthetic --device cuda --precision bf16 \\
        --batch_size 256 --steps 30 --train_dir data/mini/3dspeaker/train
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
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


def synthetic_trainer(args: argparse.Namespace, exp_dir: Path):
    """A trainer of ``--experiment`` as ``speakerlab train`` would build it (the data only sets
    the classifier width and the crop length)."""
    from hydra import compose, initialize_config_dir

    from speakerlab.distributed import single_process
    from speakerlab.training.builders import configure_backends, plain_config
    from speakerlab.training.progress import TrainingMonitor
    from speakerlab.training.trainer import Trainer

    overrides = [
        f"experiment={args.experiment}",
        f"exp_dir={exp_dir}",
        f"data.train_dir={args.train_dir}",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.device={args.device}",
        f"trainer.precision={args.precision}",
        "data.num_workers=0",
        *args.override,
    ]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = plain_config(compose("config", overrides=overrides))
    configure_backends(cfg.trainer)
    monitor = TrainingMonitor(exp_dir, enabled=False)
    try:
        return Trainer.create(cfg, single_process(args.device), monitor)
    finally:
        monitor.close()


def matmul_rate(device, size: int, repeats: int = 10) -> float:
    """Measured bf16 matrix-product rate in FLOP/s (square matrices of ``size``)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_synthetic(args: argparse.Namespace) -> dict:
    """Throughput of the trainer's step on random batches on the device (see the docstring)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        trainer = synthetic_trainer(args, Path(tmp))
        device = trainer.ctx.device
        frames, bins = trainer.run.dataset[0][0].shape
        layout = trainer.layout
        generator = torch.Generator().manual_seed(0)
        batches = [
            (
                torch.randn(layout.micro_batch, frames, bins, generator=generator).to(device),
                torch.randint(0, trainer.run.classifier.num_classes, (layout.micro_batch,)).to(
                    device
                ),
            )
            for _ in range(layout.accumulate_steps)
        ]
        trainer.train_net.train()

        def step(i: int) -> None:
            trainer._train_step(0, i % trainer.steps_per_epoch, batches)

        with FlopCounterMode(display=False) as counter:
            step(0)
        flops = counter.get_total_flops()
        for i in range(args.warmup):
            step(i)
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            for i in range(args.steps):
                step(i)
            synchronize(device)
            seconds = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            peak = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            peak = None
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        rate = matmul_rate(device, args.matmul_size)
    model_rate = flops * args.steps / seconds
    return {
        "mode": "synthetic",
        "device": str(device),
        "precision": args.precision,
        "global_batch": layout.global_batch,
        "frames": frames,
        "steps": args.steps,
        "samples_per_second": layout.global_batch * args.steps / seconds,
        "flops_per_step": flops,
        "model_flops_per_second": model_rate,
        "bf16_matmul_flops_per_second": rate,
        "model_share_of_matmul_rate": model_rate / rate,
        "peak_memory_gib": peak,
        "host_syncs_in_timed_steps": syncs if device.type == "cuda" else None,
    }


def run_overheads(args: argparse.Namespace) -> dict:
    """Per-step cost of the non-finite guards, against one training step in the same run: the
    batch-norm buffer copy and restore of ``trainer.skip_nonfinite``, the device-side running
    statistics and the gradient-norm finiteness check (both always on)."""
    import torch

    from speakerlab.training.nonfinite import BufferSnapshot
    from speakerlab.training.stats import RunningStats

    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        trainer = synthetic_trainer(args, Path(tmp))
        device, net = trainer.ctx.device, trainer.run.net
        frames, bins = trainer.run.dataset[0][0].shape
        batch = trainer.layout.micro_batch
        features = torch.randn(batch, frames, bins, device=device)
        labels = torch.randint(0, trainer.run.classifier.num_classes, (batch,), device=device)
        net.train()

        def timed(work, repeats: int) -> float:
            work()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                work()
            synchronize(device)
            return (time.perf_counter() - start) / repeats

        step = timed(lambda: trainer._train_step(0, 0, [(features, labels)]), args.steps)
        snapshot = BufferSnapshot(net)
        stats = RunningStats(device)
        loss = torch.ones((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        bad = torch.zeros((), dtype=torch.bool, device=device)
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        costs = {
            "buffer_copy_and_restore": timed(lambda: (snapshot.take(), snapshot.restore()), 200),
            "running_statistics": timed(lambda: stats.add_step(1, loss, correct, batch, bad), 200),
            "gradient_finiteness": timed(
                lambda: torch.isfinite(torch.nn.utils.get_total_norm(grads)), 200
            ),
        }
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    return {
        "mode": "overheads",
        "device": str(device),
        "global_batch": batch,
        "step_seconds": step,
        "buffer_bytes": buffers,
        **{f"{name}_seconds": seconds for name, seconds in costs.items()},
        **{f"{name}_share_of_step": seconds / step for name, seconds in costs.items()},
    }


def synthetic_line(result: dict, label: str) -> str:
    """One summary line of a synthetic run (tools/gpu_check.sh)."""
    syncs = result["host_syncs_in_timed_steps"]
    return (
        f"{label}: {result['samples_per_second']:.1f} samples/s on synthetic batches of "
        f"{result['global_batch']} x {result['frames']} frames, model "
        f"{result['model_flops_per_second'] / 1e12:.2f} TFLOP/s = "
        f"{100 * result['model_share_of_matmul_rate']:.1f} % of the bf16 matmul rate "
        f"{result['bf16_matmul_flops_per_second'] / 1e12:.1f} TFLOP/s"
        + ("" if syncs is None else f", peak memory {result['peak_memory_gib']:.1f} GiB")
        + ("" if syncs is None else f", host waits in {result['steps']} steps: {syncs}")
    )


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
    synthetic = parser.add_argument_group("synthetic mode")
    synthetic.add_argument("--synthetic", action="store_true", help="the step alone, no loader")
    synthetic.add_argument(
        "--overheads", action="store_true", help="per-step cost of the non-finite guards"
    )
    synthetic.add_argument("--experiment", default="eres2net")
    synthetic.add_argument("--device", default="cpu")
    synthetic.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    synthetic.add_argument("--matmul_size", type=int, default=8192)
    synthetic.add_argument("--label", default=None, help="print a one-line summary with this")
    synthetic.add_argument("--override", nargs="*", default=[], help="more Hydra overrides")
    args = parser.parse_args()
    if args.overheads:
        print(json.dumps(run_overheads(args), indent=1))
        return
    if args.synthetic:
        result = run_synthetic(args)
        print(json.dumps(result, indent=1))
        if args.label:
            print(synthetic_line(result, args.label))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        return
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
