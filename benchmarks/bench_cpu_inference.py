"""CPU inference: whole-process speed against the machine's matrix-product limit, fp32/int8/bf16.

Every method embeds the same recordings (uniform 6-10 s by default) in a fresh process, timed
from outside, so Python start-up, imports, model loading, audio reading, fbank and writing the
embeddings all count:

* ``plain loop``: the baseline, a plain PyTorch loop (read, fbank, embed one at a time);
* ``plain loop, passive``: the same with ``OMP_WAIT_POLICY=PASSIVE``;
* ``cli onnx`` / ``cli torch``: ``python -m speakerlab extract --backend onnx|torch`` on the
  checkpoint, as the command stands (the ONNX backend exports the model on every run);
  ``cli onnx file``: the same command given the exported ``.onnx`` file;
* ``onnx fp32`` / ``onnx int8``: the tuned ONNX Runtime path on a model exported (and
  quantised, :mod:`speakerlab.quantize`) beforehand;
* ``torch fp32`` / ``torch bf16``: the tuned PyTorch path
  (:class:`speakerlab.cpu_inference.CpuTorchEmbedder`);
  the tuned paths run ``speakerlab.extract.extract_embeddings`` in one process (no loader
  worker), with passive thread waits and freed memory kept for reuse
  (:func:`speakerlab.cpu_inference.reuse_freed_memory`), and probe the model's minimum input
  length once instead of by binary search.

Efficiency is the model's FLOPs over all recordings (:mod:`speakerlab.flops`) per wall second,
divided by the FLOP/s of a 2048^3 SGEMM measured in the same run with the same thread count, by
torch (MKL) and by ONNX Runtime (MLAS); the faster of the two is the machine's limit. The same
ratio per CPU-second (the process's user + system time) is printed too: on a machine shared with
other processes it says what the code costs, where wall time also says how busy the machine was.

    python benchmarks/bench_cpu_inference.py --model eres2net --num-utts 96 --out cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
from bench_extraction import MODELS, make_model  # same folder

from speakerlab.onnx_export import OnnxEmbedder

METHODS = (
    "plain loop",
    "plain loop, passive",
    "cli onnx",
    "cli torch",
    "cli onnx file",
    "onnx fp32",
    "torch fp32",
    "onnx int8",
    "torch bf16",
)
BASELINE = "plain loop"


# --------------------------------------------------------------------------- workers


def worker_main(args: argparse.Namespace) -> None:
    """One method in this (fresh) process; writes its embeddings and start-up time."""
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    if args.worker.startswith("plain"):
        np.savez(out_dir / "embeddings.npz", **plain_loop(args.source, args.wav_scp))
        return  # its start-up is not separated from its work

    from speakerlab.cpu_inference import reuse_freed_memory
    from speakerlab.extract import extract_embeddings

    reuse_freed_memory()
    embedder = tuned_embedder(args.worker, args.source, args.threads, args.wav_scp)
    started = time.time()
    extract_embeddings(args.wav_scp, embedder, out_dir, num_workers=0, progress=False)
    (out_dir / "startup.json").write_text(json.dumps({"ready": started - args.t0}))


def plain_loop(source: str, wav_scp: str) -> dict[str, np.ndarray]:
    """The baseline: the loaded PyTorch model, one utterance at a time."""
    from speakerlab.audio import load_audio
    from speakerlab.features import fbank
    from speakerlab.pretrained import load_model

    model = load_model(source).model
    out = {}
    with torch.no_grad():
        for line in Path(wav_scp).read_text().splitlines():
            utt, path = line.split()
            out[utt] = model(fbank(load_audio(path)).unsqueeze(0))[0].numpy()
    return out


def tuned_embedder(method: str, source: str, threads: int, wav_scp: str):
    from speakerlab.audio import audio_info
    from speakerlab.features import num_frames

    if method.startswith("onnx"):
        embedder = TunedOnnxEmbedder(source, threads)
    else:
        from speakerlab.cpu_inference import CpuTorchEmbedder
        from speakerlab.pretrained import load_model

        embedder = CpuTorchEmbedder(load_model(source).model, method.split()[-1])
    # One probe replaces the binary search for the minimum length: at the shortest recording's
    # length, or at the 200 frames that extraction requires of every model if that is shorter.
    shortest = min(
        num_frames(audio_info(line.split()[1]).frames)
        for line in Path(wav_scp).read_text().splitlines()
    )
    probe = min(shortest, 200)
    if not embedder._accepts(probe):
        raise SystemExit(f"the model gives no finite embedding for {probe} frames")
    embedder._min_frames = probe
    return embedder


class TunedOnnxEmbedder(OnnxEmbedder):
    """ONNX Runtime with :func:`speakerlab.cpu_inference.onnx_session_options`: a stand-in for
    ``OnnxEmbedder`` once it takes session options (see the integration notes)."""

    def __init__(self, path: str, threads: int) -> None:  # replaces the parent's session set-up
        import onnxruntime

        from speakerlab.cpu_inference import onnx_session_options

        self.session = onnxruntime.InferenceSession(
            path, onnx_session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.feat_dim = self.session.get_inputs()[0].shape[2]


# --------------------------------------------------------------------------- set-up


def make_recordings(directory: Path, count: int, low: float, high: float, seed: int) -> Path:
    """``count`` 16 kHz recordings of uniform random length in [low, high] s, and their scp."""
    rng = np.random.default_rng(seed)
    lines = []
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        t = np.arange(int(rng.uniform(low, high) * 16000)) / 16000
        tone = 0.3 * np.sin(2 * np.pi * (110 + 9 * i + 40 * np.sin(2 * np.pi * 0.5 * t)) * t)
        wav = tone + 0.05 * rng.standard_normal(t.size)
        path = directory / f"utt{i:04d}.wav"
        soundfile.write(path, wav.astype(np.float32), 16000)
        lines.append(f"utt{i:04d} {path}\n")
    scp = directory / "wav.scp"
    scp.write_text("".join(lines))
    return scp


def command(method: str, files: dict[str, Path], out_dir: Path, threads: int) -> list[str]:
    if method.startswith("cli"):
        model = files["onnx" if method == "cli onnx file" else "ckpt"]
        return [
            *(sys.executable, "-m", "speakerlab", "extract", "--model", str(model)),
            *("--wav-scp", str(files["wav_scp"]), "--out-dir", str(out_dir)),
            *("--backend", method.split()[1], "--device", "cpu", "--no-progress"),
        ]
    source = {"onnx fp32": "onnx", "onnx int8": "int8"}.get(method, "ckpt")
    worker = "plain" if method.startswith("plain") else method
    return [
        *(sys.executable, __file__, "--worker", worker, "--source", str(files[source])),
        *("--wav-scp", str(files["wav_scp"]), "--out-dir", str(out_dir)),
        *("--threads", str(threads), "--t0", repr(time.time())),
    ]


def run_method(method: str, files: dict[str, Path], out_dir: Path, threads: int) -> dict:
    """Run one method in a fresh process: wall and CPU seconds, start-up, embeddings."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = str(threads)
    if method != "plain loop" and not method.startswith("cli"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    out_dir.mkdir(parents=True)
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command(method, files, out_dir, threads), env=env, check=True)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    startup_file = out_dir / "startup.json"
    startup = json.loads(startup_file.read_text())["ready"] if startup_file.is_file() else None
    return {"wall": wall, "cpu": cpu, "startup": startup, "embeddings": read_output(out_dir)}


def read_output(out_dir: Path) -> dict[str, np.ndarray]:
    if (out_dir / "embeddings.npz").is_file():
        return dict(np.load(out_dir / "embeddings.npz"))
    from speakerlab.extract import read_embeddings

    return read_embeddings(out_dir / "embedding.scp")


def cosines(result: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> np.ndarray:
    a = np.stack([result[k] for k in reference])
    b = np.stack(list(reference.values()))
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def sgemm_rates(threads: int) -> dict[str, float]:
    from speakerlab.flops import matmul_flops_per_second, onnxruntime_matmul_flops_per_second

    torch.set_num_threads(threads)
    rates = {}
    for clock_name, clock in (("wall", time.perf_counter), ("cpu", time.process_time)):
        rates[f"torch_{clock_name}"] = matmul_flops_per_second(clock=clock)
        rates[f"onnxruntime_{clock_name}"] = onnxruntime_matmul_flops_per_second(
            num_threads=threads, clock=clock
        )
    return rates


# --------------------------------------------------------------------------- main


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Path], dict]:
    """Recordings, checkpoint, ONNX export and int8 model; what each preparation took."""
    from speakerlab.audio import load_audio
    from speakerlab.features import fbank
    from speakerlab.models.checkpoint import save_embedding_model
    from speakerlab.onnx_export import export_onnx
    from speakerlab.quantize import quantize_onnx

    model = make_model(args.model)
    files = {
        "wav_scp": make_recordings(
            tmp / "wav", args.num_utts, args.min_seconds, args.max_seconds, seed=0
        ),
        "ckpt": tmp / "model.ckpt",
        "onnx": tmp / "model.onnx",
        "int8": tmp / "model.int8.onnx",
    }
    save_embedding_model(model, files["ckpt"])
    times = {}
    start = time.perf_counter()
    export_onnx(model, files["onnx"])
    times["onnx_export_s"] = time.perf_counter() - start
    calibration_scp = make_recordings(
        tmp / "calibration", args.calibration_utts, args.min_seconds, args.max_seconds, seed=1
    )
    calibration = [
        fbank(load_audio(line.split()[1])) for line in calibration_scp.read_text().splitlines()
    ]
    start = time.perf_counter()
    _, times["int8_calibration_min_cosine"] = quantize_onnx(
        files["onnx"], files["int8"], calibration
    )
    times["int8_quantize_s"] = time.perf_counter() - start
    return files, times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="eres2net", choices=list(MODELS))
    parser.add_argument("--num-utts", type=int, default=96)
    parser.add_argument("--min-seconds", type=float, default=6.0)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs each")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--calibration-utts", type=int, default=8)
    parser.add_argument("--out", help="also write the results as JSON here")
    # Internal: run one method in this process.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--wav-scp", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    methods = [BASELINE, *(m for m in args.methods if m != BASELINE)]

    from speakerlab.features import num_frames
    from speakerlab.flops import model_flops_per_length

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files, prep = prepare(args, tmp)
        lengths = [
            num_frames(soundfile.info(line.split()[1]).frames)
            for line in files["wav_scp"].read_text().splitlines()
        ]
        per_length = model_flops_per_length(make_model(args.model), lengths)
        total_flops = float(sum(per_length[n] for n in lengths))
        audio_seconds = sum(
            soundfile.info(line.split()[1]).duration
            for line in files["wav_scp"].read_text().splitlines()
        )
        best: dict[str, dict] = {}
        sgemm: dict[str, float] = {}
        for repeat in range(args.repeats):  # methods take turns: load changes hit all of them
            for key, rate in sgemm_rates(args.threads).items():
                sgemm[key] = max(sgemm.get(key, 0.0), rate)
            for method in methods:
                run_dir = tmp / f"run{repeat}" / method.replace(" ", "_").replace(",", "")
                result = run_method(method, files, run_dir, args.threads)
                if method not in best or result["wall"] < best[method]["wall"]:
                    best[method] = result
                print(f"  repeat {repeat + 1}: {method}: {result['wall']:.1f} s", file=sys.stderr)
    report(args, methods, best, sgemm, total_flops, audio_seconds, prep, load_start)


def report(args, methods, best, sgemm, total_flops, audio_seconds, prep, load_start) -> None:
    limit_wall = max(sgemm["torch_wall"], sgemm["onnxruntime_wall"])
    limit_cpu = max(sgemm["torch_cpu"], sgemm["onnxruntime_cpu"])
    reference = best[BASELINE]["embeddings"]
    rows = []
    for method in methods:
        result = best[method]
        cos = cosines(result["embeddings"], reference)
        rows.append(
            {
                "method": method,
                "wall_s": result["wall"],
                "cpu_s": result["cpu"],
                "startup_s": result["startup"],
                "rtf": result["wall"] / audio_seconds,
                "speedup": best[BASELINE]["wall"] / result["wall"],
                "gflops_wall": total_flops / result["wall"] / 1e9,
                "of_limit_wall": total_flops / result["wall"] / limit_wall,
                "of_mkl_sgemm_wall": total_flops / result["wall"] / sgemm["torch_wall"],
                "gflops_per_cpu_s": total_flops / result["cpu"] / 1e9,
                "of_limit_cpu": total_flops / result["cpu"] / limit_cpu,
                "min_cosine": float(cos.min()),
                "mean_cosine": float(cos.mean()),
            }
        )
    summary = {
        "model": args.model,
        "model_kwargs": MODELS[args.model],
        "num_utts": args.num_utts,
        "audio_seconds": audio_seconds,
        "gflop_total": total_flops / 1e9,
        "gflop_per_8s": total_flops / audio_seconds * 8 / 1e9,
        "threads": args.threads,
        "sgemm_gflops": {k: v / 1e9 for k, v in sgemm.items()},
        "preparation": prep,
        "load_average": [load_start, os.getloadavg()[0]],
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "results": rows,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
