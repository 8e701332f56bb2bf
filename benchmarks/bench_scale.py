"""How every stage's cost grows with the corpus: 1 %, 10 % and 100 % of the real 3D-Speaker size.

For each size, a corpus in the 3D-Speaker layout with short noise files (see
``benchmarks/scale_corpus.py``) is written and measured:

* stage 1 (``local/prepare_3dspeaker.py``) and stage 2 (``speakerlab make-index``): wall time and
  peak memory (the largest resident set of the command's main process, and the largest sum of
  proportional set sizes over its process tree, sampled every 0.1 s);
* a training DataLoader with 4 workers (set up as training sets them up) making one pass over
  the index: each worker's PSS (shared pages counted once over the processes sharing them) and
  private memory at its first item and after its share of the epoch. The pass reads what a
  training item reads of the index (path, utterance, length, speaker) without decoding audio,
  whose cost does not depend on the corpus;
* the sampler's per-epoch set-up time and the classifier's size (3 speeds x speakers classes);
* scoring three trial lists with metrics, and with AS-Norm against a cohort;
* extraction's set-up (the header scan of the test list).

Then two fixed points: ``make-index`` over a 200,000-entry list (made of the largest size's
files), and the worker pass over an index of about a million rows (the same list at 0.22 s per
row). ``--baseline DIR`` measures those two points with the code in DIR too (another checkout,
e.g. ``git worktree add /tmp/base main``), for ratios taken in the same run.

    python benchmarks/bench_scale.py --work_dir /tmp/scale --fractions 0.01 0.1 1 \\
        --subtype PCM_U8 --baseline /tmp/base > scale.json

Disk: ``scale_corpus.CorpusPlan.disk_bytes`` (about 24 GB at 100 % with 16-bit samples, half that
with ``--subtype PCM_U8``); each corpus is removed after its size unless ``--keep``. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_corpus import TRIAL_LISTS, CorpusPlan, generate_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKERS = 4
POINT_ENTRIES = 200_000
MILLION_ROWS_SEGMENT = 0.22  # seconds per row: 0.5-2 s files give about 5.2 rows each
EMBEDDING_SIZE = 192
SPEEDS = 3
COHORT_AT_FULL_SIZE = 5000

# Runs a script or module with the speakerlab of the folder given first (the editable install's
# finder is removed so that the folder wins over the installed tree).
BOOT = (
    "import runpy, sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in type(f).__module__]; "
    "src = sys.argv.pop(1); sys.path.insert(0, src); what = sys.argv.pop(1); "
    "runpy.run_path(what, run_name='__main__') if what.endswith('.py') else "
    "runpy.run_module(what, run_name='__main__', alter_sys=True)"
)


# ------------------------------------------------------------------------------ memory


def smaps(pid: int | str = "self") -> dict[str, float]:
    """Rss, Pss and private memory (MB) of a process, from ``/proc/<pid>/smaps_rollup``."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return {
        "rss_mb": fields["Rss"],
        "pss_mb": fields["Pss"],
        "private_mb": fields["Private_Clean"] + fields["Private_Dirty"],
    }


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as f:
                    todo += [int(child) for child in f.read().split()]
        except OSError:
            continue
    return pids


def tree_pss_mb(pid: int) -> float:
    total = 0.0
    for member in process_tree(pid):
        try:
            total += smaps(member)["pss_mb"]
        except (OSError, KeyError):
            pass  # ended between the listing and the read
    return total


def peak_rss_mb(pid: int) -> float:
    """``VmHWM``: the largest resident set of the process since it started its program (the
    rusage of ``wait4`` would count the forked parent's pages from before ``exec``)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_measured(args: list[str], src: Path = REPO) -> dict:
    """Run ``args`` (a script path or module name, then its arguments) with the speakerlab of
    ``src``: wall time, the peak RSS of its main process and the peak sum of PSS over its
    process tree (both sampled every 0.1 s)."""
    command = [sys.executable, "-c", BOOT, str(src), *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        peak_pss, peak_rss, done = [0.0], [0.0], threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                peak_pss[0] = max(peak_pss[0], tree_pss_mb(proc.pid))
                peak_rss[0] = max(peak_rss[0], peak_rss_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {stderr[-2000:]}")
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(peak_rss[0], 1),
        "peak_tree_pss_mb": round(peak_pss[0], 1),
        "stdout": stdout.strip().splitlines()[-3:],
    }


# ------------------------------------------------------------------------------ measures


def worker_pass_main(index_path: str, num_workers: int) -> None:
    """(In a subprocess) One epoch of a DataLoader over the index; prints each worker's memory."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from speakerlab.data.index import load_train_index
    from speakerlab.data.sampler import DistributedResumableSampler

    try:  # workers set up as this revision's training sets them up
        from speakerlab.data.dataset import init_data_worker as worker_init
    except ImportError:  # a baseline from before init_data_worker
        from speakerlab.data.dataset import limit_worker_threads as worker_init

    start = time.perf_counter()
    index = load_train_index(index_path)
    load_seconds = time.perf_counter() - start
    first_memory: dict[str, float] = {}

    class IndexPass(Dataset):
        """What a training item reads of the index, without the audio."""

        def __len__(self) -> int:
            return len(index)

        def __getitem__(self, row: int) -> tuple[int, int, float]:
            if not first_memory:
                first_memory.update(smaps())
            touched = (
                len(index.paths[row])
                + len(index.utts[row])
                + int(index.num_samples[row])
                + int(index.speaker_ids[row])
            )
            return os.getpid(), touched, first_memory["pss_mb"], first_memory["private_mb"]

    sampler = DistributedResumableSampler(len(index), seed=0)
    loader = DataLoader(
        IndexPass(),
        batch_size=256,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=True,
        worker_init_fn=worker_init,
    )
    start = time.perf_counter()
    first: dict[int, tuple[float, float]] = {}
    for pids, _, pss, private in loader:
        for pid, a, b in zip(pids.tolist(), pss.tolist(), private.tolist()):
            first.setdefault(pid, (a, b))
    epoch_seconds = time.perf_counter() - start
    workers = []
    for pid, (pss, private) in sorted(first.items()):
        end = smaps(pid)
        workers.append(
            {
                "first_item_pss_mb": round(pss, 1),
                "end_pss_mb": round(end["pss_mb"], 1),
                "first_item_private_mb": round(private, 1),
                "end_private_mb": round(end["private_mb"], 1),
            }
        )
    print(
        json.dumps(
            {
                "rows": len(index),
                "load_seconds": round(load_seconds, 2),
                "epoch_seconds": round(epoch_seconds, 2),
                "main_pss_mb": round(smaps()["pss_mb"], 1),
                "workers": workers,
                "torch": torch.__version__,
            }
        )
    )


def worker_pass(index_path: Path, src: Path = REPO) -> dict:
    result = run_measured(
        [__file__, "--worker_pass", str(index_path), "--num_workers", str(WORKERS)], src
    )
    report = json.loads(result["stdout"][-1])
    workers = report.pop("workers")
    return {
        **report,
        "worker_end_pss_mb_max": max(w["end_pss_mb"] for w in workers),
        "worker_pss_growth_mb_max": max(w["end_pss_mb"] - w["first_item_pss_mb"] for w in workers),
        "worker_end_private_mb_max": max(w["end_private_mb"] for w in workers),
        "workers": workers,
    }


def sampler_setup(rows: int, repeats: int = 5) -> dict:
    from speakerlab.data.sampler import DistributedResumableSampler

    sampler = DistributedResumableSampler(rows, seed=0)
    times = []
    for epoch in range(repeats):
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        next(iter(sampler))
        times.append(time.perf_counter() - start)
    return {"rows": rows, "seconds": round(min(times), 4)}


def classifier_size(num_classes: int) -> dict:
    """Parameters and memory of the cosine classifier, and one training step on a batch."""
    import torch

    from speakerlab.training.losses import CosineClassifier, MarginSoftmaxLoss

    torch.manual_seed(0)
    classifier = CosineClassifier(EMBEDDING_SIZE, num_classes)
    loss = MarginSoftmaxLoss(margin=0.2)
    params = classifier.weight.numel()
    embeddings = torch.randn(256, EMBEDDING_SIZE)
    labels = torch.randint(num_classes, (256,))
    times = []
    for _ in range(6):  # the first step warms up
        start = time.perf_counter()
        loss(classifier(embeddings), labels).backward()
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return {
        "classes": num_classes,
        "parameters": params,
        "weights_mb": round(params * 4 / 2**20, 1),
        "with_grad_and_momentum_mb": round(3 * params * 4 / 2**20, 1),
        "step_seconds_batch256": round(times[len(times) // 2], 4),  # median
    }


def scoring(test_dir: Path, trials_dir: Path, cohort_size: int, work: Path) -> dict:
    """Random unit embeddings of the test set; the three lists scored with metrics, then with
    AS-Norm against a random cohort."""
    import kaldiio

    from speakerlab.data.kaldi_dir import read_table
    from speakerlab.scoring import ScoringSetup, score_trials

    utts = list(read_table(test_dir / "wav.scp"))
    rng = np.random.default_rng(0)
    scp = work / "embeddings.scp"
    with kaldiio.WriteHelper(f"ark,scp:{work / 'embeddings.ark'},{scp}") as writer:
        for utt in utts:
            writer(utt, rng.standard_normal(EMBEDDING_SIZE).astype(np.float32))
    lists = [trials_dir / name for name in TRIAL_LISTS]
    trials = sum(1 for path in lists for _ in open(path, encoding="utf-8"))
    start = time.perf_counter()
    score_trials(scp, lists, work / "plain", ScoringSetup(det_plot=False))
    plain = time.perf_counter() - start
    cohort = rng.standard_normal((cohort_size, EMBEDDING_SIZE)).astype(np.float32)
    cohort /= np.linalg.norm(cohort, axis=1, keepdims=True)
    start = time.perf_counter()
    score_trials(scp, lists, work / "asnorm", ScoringSetup(cohort=cohort, det_plot=False))
    asnorm = time.perf_counter() - start
    return {
        "embeddings": len(utts),
        "trials": trials,
        "cohort": cohort_size,
        "seconds": round(plain, 2),
        "asnorm_seconds": round(asnorm, 2),
    }


def extraction_scan(wav_scp: Path) -> dict:
    from speakerlab.extract import scan_wav_scp

    start = time.perf_counter()
    utterances = scan_wav_scp(wav_scp)
    return {"utterances": len(utterances), "seconds": round(time.perf_counter() - start, 2)}


def disk_gb(folder: Path) -> float:
    out = subprocess.run(["du", "-sk", str(folder)], capture_output=True, text=True, check=True)
    return round(int(out.stdout.split()[0]) / 2**20, 2)


def index_rows(result: dict) -> int:
    """Rows reported by ``make-index`` ("<path>: N rows, ...")."""
    return int(result["stdout"][-1].split(": ", 1)[1].split()[0])


def make_index_command(train_dir: Path, out: Path, segment_seconds: float = 4.0) -> list[str]:
    return [
        "speakerlab",
        "make-index",
        "--data_dir",
        str(train_dir),
        "--out",
        str(out),
        "--segment_seconds",
        str(segment_seconds),
    ]


# ------------------------------------------------------------------------------ runs


def measure_size(fraction: float, work: Path, subtype: str, num_workers: int | None) -> dict:
    plan = CorpusPlan.at(fraction, subtype)
    root = work / f"size_{fraction:g}"
    start = time.perf_counter()
    corpus = generate_corpus(root / "raw", plan, num_workers)
    result: dict = {
        "fraction": fraction,
        "files": plan.num_files,
        "generate_seconds": round(time.perf_counter() - start, 1),
        "disk_gb_estimated": round(plan.disk_bytes() / 2**30, 2),
        "disk_gb": disk_gb(corpus),
    }
    data = root / "data"
    shutil.rmtree(data, ignore_errors=True)
    prepare = str(REPO / "local" / "prepare_3dspeaker.py")
    result["stage1"] = run_measured([prepare, "--corpus_dir", str(corpus), "--data_dir", str(data)])
    train_dir, index = data / "3dspeaker" / "train", root / "train_index.tsv"
    index.unlink(missing_ok=True)
    result["stage2"] = run_measured(make_index_command(train_dir, index))
    rows = index_rows(result["stage2"])
    result["stage2"]["rows"] = rows
    result["worker_pass"] = worker_pass(index)
    result["sampler"] = sampler_setup(rows)
    result["classifier"] = classifier_size(SPEEDS * plan.train_speakers)
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        cohort = max(50, round(COHORT_AT_FULL_SIZE * fraction))
        result["scoring"] = scoring(
            data / "3dspeaker" / "test", data / "3dspeaker" / "trials", cohort, Path(scratch)
        )
    result["extraction_scan"] = extraction_scan(data / "3dspeaker" / "test" / "wav.scp")
    return result


def point_list(train_dir: Path, out_dir: Path, entries: int) -> Path:
    """A Kaldi dir of ``entries`` utterances: the files of ``train_dir``, cycled if needed."""
    from speakerlab.data.kaldi_dir import read_table, write_table

    wav_scp, utt2spk = read_table(train_dir / "wav.scp"), read_table(train_dir / "utt2spk")
    utts = list(wav_scp)
    chosen = [
        (f"{utts[i % len(utts)]}-{i // len(utts)}", utts[i % len(utts)]) for i in range(entries)
    ]
    write_table(out_dir / "wav.scp", ((new, wav_scp[old]) for new, old in chosen))
    write_table(out_dir / "utt2spk", ((new, utt2spk[old]) for new, old in chosen))
    return out_dir


def measure_points(train_dir: Path, work: Path, baseline: Path | None) -> dict:
    data = point_list(train_dir, work / "points" / "train", POINT_ENTRIES)
    points: dict = {"entries": POINT_ENTRIES}
    for name, src in (("current", REPO), ("baseline", baseline)):
        if src is None:
            continue
        out = work / "points" / name
        out.mkdir(parents=True, exist_ok=True)
        make = run_measured(make_index_command(data, out / "index.tsv"), src)
        million = run_measured(
            make_index_command(data, out / "index_1m.tsv", MILLION_ROWS_SEGMENT), src
        )
        million["rows"] = index_rows(million)
        points[name] = {
            "make_index": make,
            "make_index_1m_rows": million,
            "worker_pass_1m_rows": worker_pass(out / "index_1m.tsv", src),
        }
    return points


def machine() -> dict:
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor(),
    )
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    return {
        "cpu": model,
        "avx512": "avx512f" in flags.split(),
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "scale")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--subtype", default="PCM_16", choices=["PCM_16", "PCM_U8"])
    parser.add_argument("--num_workers", type=int, help="corpus-writing processes (default: cores)")
    parser.add_argument("--baseline", type=Path, help="another checkout, measured at the points")
    parser.add_argument("--no_points", action="store_true", help="skip the 200k/1M-row points")
    parser.add_argument("--keep", action="store_true", help="keep the corpora for another run")
    parser.add_argument("--worker_pass", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_pass:
        worker_pass_main(args.worker_pass, args.num_workers or WORKERS)
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine(), "subtype": args.subtype, "sizes": []}
    fractions = sorted(args.fractions)
    for fraction in fractions:
        size = measure_size(fraction, args.work_dir, args.subtype, args.num_workers)
        report["sizes"].append(size)
        print(json.dumps(size), file=sys.stderr, flush=True)
        root = args.work_dir / f"size_{fraction:g}"
        if fraction == fractions[-1] and not args.no_points:
            report["points"] = measure_points(
                root / "data" / "3dspeaker" / "train", args.work_dir, args.baseline
            )
            shutil.rmtree(args.work_dir / "points")
        if not args.keep:
            shutil.rmtree(root / "raw")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
