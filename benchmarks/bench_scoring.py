"""Scoring at the size of the real 3D-Speaker evaluation: three 180,000-trial lists over 20,000
test utterances (192-dim embeddings), plain and with AS-Norm against a 5,000-utterance cohort.

Builds the data once (Kaldi ark/scp, 3D-Speaker-like ids, 10 % target trials), then times, in
fresh processes so that every run pays its own imports:

* ``api``: ``speakerlab.scoring.score_trials`` on the three lists (parse, read embeddings, score,
  metrics, write score files + results + DET plot), plain and with AS-Norm (cohort loading
  included);
* ``cli``: the whole ``python -m speakerlab score`` command, plain and with AS-Norm.

With ``--baseline DIR`` (a copy of another version's ``speakerlab`` package folder's parent,
e.g. made with ``git archive <commit> speakerlab | tar -x -C DIR``) the same measurements run
for that version too, alternating with this one in the same run, so both see the same machine
load. Each figure is the best of ``--repeats``. Prints JSON (and writes it to ``--out``).

    python benchmarks/bench_scoring.py --baseline /tmp/baseline --out scoring.json
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

import kaldiio
import numpy as np

LISTS = ("trials_cross_device", "trials_cross_distance", "trials_cross_dialect")
HERE = Path(__file__).resolve().parent


def make_data(directory: Path, num_utts: int, dim: int, num_trials: int, cohort: int) -> None:
    """Embeddings, cohort and three trial lists (targets: pairs of one of 20-utterance speakers)."""
    rng = np.random.default_rng(0)
    utts = [
        f"3D_SPK_{i // 20:05d}_{i % 20:03d}_Device{i % 8 + 1:02d}_Distance{i % 3:02d}"
        for i in range(num_utts)
    ]
    centres = rng.standard_normal((num_utts // 20 + 1, dim)).astype(np.float32)
    matrix = centres[np.arange(num_utts) // 20] + 1.5 * rng.standard_normal((num_utts, dim))
    kaldiio.save_ark(
        str(directory / "embedding.ark"),
        dict(zip(utts, matrix.astype(np.float32))),
        scp=str(directory / "embedding.scp"),
    )
    cohort_matrix = rng.standard_normal((cohort, dim)).astype(np.float32)
    kaldiio.save_ark(
        str(directory / "cohort.ark"),
        {f"cohort_{i:05d}": v for i, v in enumerate(cohort_matrix)},
        scp=str(directory / "cohort.scp"),
    )
    for name in LISTS:
        enrol = rng.integers(0, num_utts, num_trials)
        is_target = rng.random(num_trials) < 0.1
        same_speaker = (enrol // 20) * 20 + rng.integers(0, 20, num_trials)
        test = np.where(
            is_target, np.minimum(same_speaker, num_utts - 1), rng.integers(0, num_utts, num_trials)
        )
        labels = np.where((enrol // 20) == (test // 20), "target", "nontarget")
        with open(directory / name, "w") as f:
            f.writelines(
                map("{} {} {}\n".format, (utts[i] for i in enrol), (utts[i] for i in test), labels)
            )


def measure_api(data: Path, as_norm: bool) -> float:
    """Seconds for score_trials on the three lists (run inside a fresh process)."""
    start = time.perf_counter()
    from speakerlab.scoring import ScoringSetup, load_cohort, score_trials

    setup = ScoringSetup()
    if as_norm:
        setup = ScoringSetup(cohort=load_cohort(data / "cohort.scp"), top_k=300)
    score_trials(data / "embedding.scp", [data / n for n in LISTS], data / "out_api", setup)
    return time.perf_counter() - start


def run_child(tree: Path, args: list[str], cwd: Path) -> tuple[str, float]:
    """Run Python with the package at ``tree``; its stdout and the CPU seconds it used."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{args} failed under {tree}:\n{result.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result.stdout, cpu


def timings(tree: Path, data: Path) -> dict[str, float]:
    """One round of every measurement for the package at ``tree``: wall seconds of the scoring
    call (api) and of the whole command (cli), and the CPU seconds of the command."""
    times = {}
    for as_norm in (False, True):
        name = "as-norm" if as_norm else "plain"
        flag = ["--as-norm"] if as_norm else []
        out, _ = run_child(
            tree, [str(Path(__file__).resolve()), "--measure-api", str(data), *flag], data
        )
        times[f"api {name} (s)"] = float(out.strip().splitlines()[-1])
        command = ["-m", "speakerlab", "score", "--embeddings", str(data / "embedding.scp")]
        command += ["--trials", *[str(data / n) for n in LISTS], "--out-dir", str(data / "out_cli")]
        if as_norm:
            command += ["--cohort", str(data / "cohort.scp"), "--top-k", "300"]
        start = time.perf_counter()
        _, cpu = run_child(tree, command, data)
        times[f"cli {name} (s)"] = time.perf_counter() - start
        times[f"cli {name} cpu (s)"] = cpu
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-trials", type=int, default=180_000, help="trials per list")
    parser.add_argument("--num-utts", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--cohort", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--baseline", type=Path, help="folder holding another speakerlab package")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--measure-api", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--as-norm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_api:
        print(measure_api(args.measure_api, args.as_norm))
        return

    trees = {"this": HERE.parent}
    if args.baseline:
        trees = {"baseline": args.baseline.resolve(), **trees}
    best: dict[str, dict[str, float]] = {name: {} for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        make_data(data, args.num_utts, args.dim, args.num_trials, args.cohort)
        for _ in range(args.repeats):
            for name, tree in trees.items():  # alternate, so both see the same load
                for key, seconds in timings(tree, data).items():
                    best[name][key] = min(seconds, best[name].get(key, float("inf")))
    report = {
        "lists": len(LISTS),
        "trials_per_list": args.num_trials,
        "utterances": args.num_utts,
        "dim": args.dim,
        "cohort": args.cohort,
        "top_k": 300,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "best_of": args.repeats,
        "seconds": best,
    }
    if args.baseline:
        report["speedup"] = {key: best["baseline"][key] / best["this"][key] for key in best["this"]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
