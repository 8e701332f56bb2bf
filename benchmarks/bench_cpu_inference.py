"""CPU inference: whole-process speed against the machine's matrix-product limit, fp32/int8/bf16.

Every method embeds the same recordings (uniform 6-10 s by default) in a fresh process, timed
from outside, so Python start-up, imports, model loading, audio reading, fbank and writing the
embeddings all count:

* ``plain loop``: the baseline, a plain PyTorch loop (read, fbank, embed one at a time);
* ``plain loop, passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep instead
  of spinning), as the ``speakerlab`` inference commands set it: on cores shared with other
  processes spinning threads slow everything down, which this separates from the rest;
* ``torch fp32`` / ``torch bf16``: ``speakerlab extract --backend torch [--precision bf16]`` on
  the checkpoint;
* ``onnx fp32`` / ``onnx int8``: ``speakerlab extract`` given the exported ``.onnx`` file, and
  the int8 one written by ``speakerlab export-onnx --quantize int8`` (both made beforehand).

Start-up: a whole process embeds one recording of ``--startup-seconds`` (the plain loop on a
one-line list, or :meth:`speakerlab.inference.SpeakerVerifier.load` and ``embed`` as
``speakerlab embed`` does): its wall time from outside, and inside it the seconds from the end of
the imports to the first embedding (load + first embedding). Methods take turns, ``--repeats``
times; the JSON has every time and the median, and ratios between methods of the same run.

Efficiency is the model's FLOPs over all recordings (:mod:`speakerlab.flops`) per wall second,
divided by the FLOP/s of a 2048^3 SGEMM measured in the same run with the same thread count, by
torch (MKL/oneDNN) and by ONNX Runtime (MLAS); the faster of the two is the fp32 limit; bf16 is
also compared with torch's bf16 GEMM. int8 is counted in the same (fp32-equivalent) FLOPs.

    python benchmarks/bench_cpu_inference.py --model eres2net --num-utts 96 \
        --out benchmarks/results/cpu_inference_eres2net.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
from bench_extraction import MODELS, make_model  # same folder

METHODS = (
    "plain loop",
    "plain loop, passive",
    "torch fp32",
    "onnx fp32",
    "onnx int8",
    "torch bf16",
)
BASELINE = "plain loop"
SOURCES = {"torch fp32": "ckpt", "torch bf16": "ckpt", "onnx fp32": "onnx", "onnx int8": "int8"}


# --------------------------------------------------------------------------- plain loop


def worker_main(args: argparse.Namespace) -> None:
    """The baseline in this (fresh) process: the loaded PyTorch model, one utterance at a time."""
    from speakerlab.audio import load_audio
    from speakerlab.features import fbank
    from speakerlab.pretrained import load_model

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = load_model(args.source).model
    out = {}
    with torch.no_grad():
        for line in Path(args.wav_scp).read_text().splitlines():
            utt, path = line.split()
            out[utt] = model(fbank(load_audio(path)).unsqueeze(0))[0].numpy()
    loaded = time.perf_counter() - started
    np.savez(Path(args.out_dir) / "embeddings.npz", **out)
    (Path(args.out_dir) / "startup.json").write_text(json.dumps({"load_and_embed": loaded}))


def startup_main(args: argparse.Namespace) -> None:
    """Load a model as ``speakerlab embed`` does and embed one recording (timed inside)."""
    from speakerlab.inference import SpeakerVerifier

    started = time.perf_counter()
    verifier = SpeakerVerifier.load(args.source, precision=args.precision)
    verifier.embed(args.wav)
    loaded = time.perf_counter() - started
    (Path(args.out_dir) / "startup.json").write_text(json.dumps({"load_and_embed": loaded}))


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


def command(method: str, files: dict[str, Path], wav_scp: Path, out_dir: Path, threads: int):
    if method.startswith(BASELINE):
        return [
            *(sys.executable, __file__, "--worker", "--source", str(files["ckpt"])),
            *("--wav-scp", str(wav_scp), "--out-dir", str(out_dir), "--threads", str(threads)),
        ]
    backend = ("--backend", "torch") if method.startswith("torch") else ()
    precision = ("--precision", "bf16") if method.endswith("bf16") else ()
    return [
        *(sys.executable, "-m", "speakerlab", "extract", "--model", str(files[SOURCES[method]])),
        *("--wav-scp", str(wav_scp), "--out-dir", str(out_dir), *backend, *precision),
        *("--device", "cpu", "--no-progress"),
    ]


def run_method(method: str, files: dict[str, Path], wav_scp: Path, out_dir: Path, threads: int):
    """Run one method in a fresh process: wall and CPU seconds, embeddings."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = str(threads)
    if method.endswith("passive"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    out_dir.mkdir(parents=True)
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        command(method, files, wav_scp, out_dir, threads), env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr}")
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"wall": wall, "cpu": cpu, "embeddings": read_output(out_dir)}


def read_output(out_dir: Path) -> dict[str, np.ndarray]:
    if (out_dir / "embeddings.npz").is_file():
        return dict(np.load(out_dir / "embeddings.npz"))
    from speakerlab.embedding_store import read_embeddings

    return read_embeddings(out_dir / "embedding.scp")


def cosines(result: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> np.ndarray:
    a = np.stack([result[k] for k in reference])
    b = np.stack(list(reference.values()))
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def gemm_rates(threads: int) -> dict[str, float]:
    """FLOP/s of large products in this process: fp32 by torch and ONNX Runtime, bf16 by torch."""
    from speakerlab.flops import matmul_flops_per_second, onnxruntime_matmul_flops_per_second

    torch.set_num_threads(threads)
    return {
        "sgemm_torch": matmul_flops_per_second(),
        "sgemm_onnxruntime": onnxruntime_matmul_flops_per_second(num_threads=threads),
        "bf16_gemm_torch": matmul_flops_per_second(dtype=torch.bfloat16),
    }


# --------------------------------------------------------------------------- main


def speakerlab_command(*args: str) -> tuple[float, str]:
    """Run ``python -m speakerlab ARGS``: its wall time and what it printed."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "speakerlab", *args], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return time.perf_counter() - start, done.stdout.strip()


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Path], dict]:
    """Recordings, checkpoint, ONNX export and int8 model (with the commands users run)."""
    from speakerlab.models.checkpoint import save_embedding_model

    model = make_model(args.model)
    files = {
        "wav_scp": make_recordings(
            tmp / "wav", args.num_utts, args.min_seconds, args.max_seconds, seed=0
        ),
        "ckpt": tmp / "model.ckpt",
        "onnx": tmp / "model.onnx",
        "int8": tmp / "model.int8.onnx",
        "calibration": make_recordings(
            tmp / "calibration", args.calibration_utts, args.min_seconds, args.max_seconds, seed=1
        ),
    }
    one = make_recordings(tmp / "one", 1, args.startup_seconds, args.startup_seconds, seed=2)
    files["one_scp"], files["one_wav"] = one, one.parent / "utt0000.wav"
    save_embedding_model(model, files["ckpt"])
    times = {}
    times["onnx_export_s"], times["onnx_export_log"] = speakerlab_command(
        "export-onnx", "--model", str(files["ckpt"]), "--out", str(files["onnx"])
    )
    times["int8_export_s"], times["int8_export_log"] = speakerlab_command(
        *("export-onnx", "--model", str(files["ckpt"]), "--out", str(files["int8"])),
        *("--quantize", "int8", "--calibration-scp", str(files["calibration"])),
        *("--calibration-utts", str(args.calibration_utts)),
    )
    return files, times


def startup_command(method: str, files: dict[str, Path], out_dir: Path, threads: int):
    """One recording embedded by a whole process: load + first embedding."""
    if method.startswith(BASELINE):
        return command(method, files, files["one_scp"], out_dir, threads)
    return [
        *(sys.executable, __file__, "--startup", "--source", str(files[SOURCES[method]])),
        *("--wav", str(files["one_wav"]), "--out-dir", str(out_dir)),
        *("--precision", "bf16" if method.endswith("bf16") else "fp32"),
    ]


def time_startup(method: str, files: dict[str, Path], out_dir: Path, threads: int):
    """(whole process, load + first embedding) seconds."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = str(threads)
    if method != BASELINE:
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # as the speakerlab commands set it
    out_dir.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run(
        startup_command(method, files, out_dir, threads), env=env, check=True, capture_output=True
    )
    inside = json.loads((out_dir / "startup.json").read_text())["load_and_embed"]
    return time.perf_counter() - start, inside


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="eres2net", choices=list(MODELS))
    parser.add_argument("--num-utts", type=int, default=96)
    parser.add_argument("--min-seconds", type=float, default=6.0)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    parser.add_argument("--startup-seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method (median)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--calibration-utts", type=int, default=8)
    parser.add_argument("--out", help="also write the results as JSON here")
    # Internal: run the plain loop in this process.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--startup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--wav", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--wav-scp", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or args.startup:
        (worker_main if args.worker else startup_main)(args)
        return
    methods = [BASELINE, *(m for m in args.methods if m != BASELINE)]

    from speakerlab.features import num_frames
    from speakerlab.flops import model_flops_per_length

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files, prep = prepare(args, tmp)
        infos = [
            soundfile.info(line.split()[1]) for line in files["wav_scp"].read_text().splitlines()
        ]
        lengths = [num_frames(info.frames) for info in infos]
        per_length = model_flops_per_length(make_model(args.model), lengths)
        total_flops = float(sum(per_length[n] for n in lengths))
        audio_seconds = sum(info.duration for info in infos)
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        gemm: dict[str, list[float]] = {}
        for repeat in range(args.repeats):  # methods take turns: load changes hit all of them
            for key, rate in gemm_rates(args.threads).items():
                gemm.setdefault(key, []).append(rate)
            for method in methods:
                name = method.replace(" ", "_")
                result = run_method(
                    method, files, files["wav_scp"], tmp / f"run{repeat}" / name, args.threads
                )
                result["startup"], result["load_and_embed"] = time_startup(
                    method, files, tmp / f"startup{repeat}" / name, args.threads
                )
                runs[method].append(result)
                print(
                    f"  repeat {repeat + 1}: {method}: {result['wall']:.1f} s, "
                    f"start-up {result['startup']:.2f} s",
                    file=sys.stderr,
                )
    report(args, methods, runs, gemm, total_flops, audio_seconds, prep, load_start)


def report(args, methods, runs, gemm, total_flops, audio_seconds, prep, load_start) -> None:
    gemm_median = {k: statistics.median(v) for k, v in gemm.items()}
    sgemm = max(gemm_median["sgemm_torch"], gemm_median["sgemm_onnxruntime"])
    wall = {m: statistics.median(r["wall"] for r in runs[m]) for m in methods}
    reference = runs[BASELINE][0]["embeddings"]
    rows = []
    for method in methods:
        cos = cosines(runs[method][0]["embeddings"], reference)
        rate = total_flops / wall[method]
        row = {
            "method": method,
            "wall_s_median": wall[method],
            "wall_s_all": [r["wall"] for r in runs[method]],
            "cpu_s_median": statistics.median(r["cpu"] for r in runs[method]),
            "startup_s_median": statistics.median(r["startup"] for r in runs[method]),
            "startup_s_all": [r["startup"] for r in runs[method]],
            "load_and_first_embedding_s_median": statistics.median(
                r["load_and_embed"] for r in runs[method]
            ),
            "rtf": wall[method] / audio_seconds,
            "speedup_over_plain_loop": wall[BASELINE] / wall[method],
            "gflops_per_s": rate / 1e9,
            "of_sgemm": rate / sgemm,
            "cosine_to_fp32_min": float(cos.min()),
            "cosine_to_fp32_mean": float(cos.mean()),
        }
        if method.endswith("bf16"):
            row["of_bf16_gemm"] = rate / gemm_median["bf16_gemm_torch"]
        rows.append(row)
    summary = {
        "model": args.model,
        "model_kwargs": MODELS[args.model],
        "num_utts": args.num_utts,
        "audio_seconds": audio_seconds,
        "gflop_total": total_flops / 1e9,
        "gflop_per_8s": total_flops / audio_seconds * 8 / 1e9,
        "threads": args.threads,
        "repeats": args.repeats,
        "gemm_gflops_median": {k: v / 1e9 for k, v in gemm_median.items()},
        "gemm_gflops_all": {k: [x / 1e9 for x in v] for k, v in gemm.items()},
        "preparation": prep,
        "load_average": [load_start, os.getloadavg()[0]],
        "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "results": rows,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


def cpu_name() -> dict[str, object]:
    """The CPU model and whether it has AVX-512 and AVX512-BF16 (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in info.splitlines()
            if line.startswith("model name")
        ),
        "",
    )
    flags = set(
        next(
            (
                line.split(":", 1)[1].split()
                for line in info.splitlines()
                if line.startswith("flags")
            ),
            [],
        )
    )
    return {"model": model, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags}


if __name__ == "__main__":
    main()
