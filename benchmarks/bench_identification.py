"""Speaker database at scale: file size, save and load time, and the time to identify one
recording (and a batch) against 100,000 and 1,000,000 enrolled speakers, by exact search.

    python benchmarks/bench_identification.py --speakers 100000 1000000 --out ident.json

Each figure is the best of ``--repeats`` (loading, saving) or the median (and the minimum) over
``--queries`` single-recording searches. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from speakerlab.identification import SpeakerDB


def best_of(repeats: int, run) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure(num_speakers: int, dim: int, repeats: int, queries: int, directory: Path) -> dict:
    rng = np.random.default_rng(0)
    means = rng.standard_normal((num_speakers, dim), dtype=np.float32)
    names = [f"speaker_{i:07d}" for i in range(num_speakers)]
    db = SpeakerDB("weights:bench", names, means, np.ones(num_speakers, np.int64), "bench")
    path = directory / f"speakers_{num_speakers}.db"
    save = best_of(repeats, lambda: db.save(path))
    load = best_of(repeats, lambda: SpeakerDB.load(path))
    loaded = SpeakerDB.load(path)
    first = time.perf_counter()
    loaded.identify(means[0])  # the first search also normalises the matrix once
    first_search = time.perf_counter() - first
    probes = rng.standard_normal((queries, dim), dtype=np.float32)
    single = []
    for probe in probes:
        start = time.perf_counter()
        result = loaded.identify(probe, top_k=5)
        single.append(time.perf_counter() - start)
    assert len(result[0].matches) == 5
    batch = best_of(repeats, lambda: loaded.identify(probes, top_k=5))
    return {
        "speakers": num_speakers,
        "dim": dim,
        "file_mb": path.stat().st_size / 2**20,
        "save_s": save,
        "load_s": load,
        "first_search_s": first_search,
        "search_one_ms": 1000 * statistics.median(single),
        "search_one_min_ms": 1000 * min(single),  # the cost without other processes' load
        f"search_batch_of_{queries}_ms": 1000 * batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--speakers", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(n, args.dim, args.repeats, args.queries, Path(tmp)) for n in args.speakers]
    report = {"cpus": os.cpu_count(), "load_average": os.getloadavg()[0], "results": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
