"""Scoring throughput: trials per second for a million-trial list with string utterance ids.

Builds ``--num-utts`` random embeddings (Kaldi ark/scp) and a trial file of ``--num-trials``
random pairs (10% targets), then times each step of ``speakerlab.scoring``:

* parse the trial file; read the embeddings;
* map ids to rows + cosine scores; EER + minDCF (p=0.01, 0.05) -- together "score + metrics";
* AS-Norm against a cohort (``--cohort``, top ``--top-k``); writing the score file.

    python benchmarks/bench_scoring.py --num-trials 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import kaldiio
import numpy as np

from speakerlab.metrics import compute_metrics
from speakerlab.scoring import (
    as_norm,
    cosine_scores,
    l2_normalise,
    load_embeddings,
    read_trials,
    trial_rows,
    write_scores,
)


def make_data(directory: Path, num_utts: int, dim: int, num_trials: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    utts = [
        f"3D_SPK_{i // 20:05d}_{i % 20:03d}_Device{i % 8 + 1:02d}_Distance{i % 3:02d}"
        for i in range(num_utts)
    ]
    matrix = rng.standard_normal((num_utts, dim)).astype(np.float32)
    scp = directory / "embedding.scp"
    kaldiio.save_ark(str(directory / "embedding.ark"), dict(zip(utts, matrix)), scp=str(scp))
    enrol, test = rng.integers(0, num_utts, num_trials), rng.integers(0, num_utts, num_trials)
    labels = np.where(rng.random(num_trials) < 0.1, "target", "nontarget")
    trials = directory / "trials"
    with open(trials, "w") as f:
        f.writelines(
            map("{} {} {}\n".format, (utts[i] for i in enrol), (utts[i] for i in test), labels)
        )
    return scp, trials


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-trials", type=int, default=1_000_000)
    parser.add_argument("--num-utts", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--cohort", type=int, default=5000)
    parser.add_argument("--top-k", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    def timed(run):
        best, result = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = run()
            best = min(best, time.perf_counter() - start)
        return best, result

    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scp, trial_file = make_data(tmp, args.num_utts, args.dim, args.num_trials)
        times["parse trial file"], trials = timed(lambda: read_trials(trial_file))
        times["read embeddings"], table = timed(lambda: load_embeddings(scp))
        times["map ids to rows"], rows = timed(lambda: trial_rows(table, trials))
        times["cosine scores"], scores = timed(lambda: cosine_scores(table.matrix, *rows))
        times["EER + minDCF"], _ = timed(
            lambda: compute_metrics(scores, trials.labels, (0.01, 0.05))
        )
        cohort = l2_normalise(np.random.default_rng(1).standard_normal((args.cohort, args.dim)))
        times["AS-Norm"], _ = timed(
            lambda: as_norm(scores, *rows, table.matrix, cohort, args.top_k)
        )
        times["write score file"], _ = timed(
            lambda: write_scores(tmp / "out.score", trials, scores)
        )

    core = times["map ids to rows"] + times["cosine scores"] + times["EER + minDCF"]
    total = core + times["parse trial file"]
    print(
        f"{args.num_trials} trials, {args.num_utts} utterances, dim {args.dim}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    for name, seconds in times.items():
        print(f"  {name:22s} {seconds:8.3f} s  ({args.num_trials / seconds:12,.0f} trials/s)")
    print(f"  {'score + metrics':22s} {core:8.3f} s  ({args.num_trials / core:12,.0f} trials/s)")
    print(f"  {'with parsing':22s} {total:8.3f} s  ({args.num_trials / total:12,.0f} trials/s)")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "num_trials": args.num_trials,
                    "num_utts": args.num_utts,
                    "dim": args.dim,
                    "seconds": times,
                    "score_plus_metrics_trials_per_s": args.num_trials / core,
                    "with_parsing_trials_per_s": args.num_trials / total,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
