"""Forward time of every model on CPU for an 8 s utterance (798 fbank frames), batch 1 and 16,
and the time to load its checkpoint.

Usage: python benchmarks/bench_models.py [--threads 2] [--repeats 3] [--out models.json]
Prints one JSON object: per model its parameter count; mean forward seconds per batch, per
utterance and the real-time factor (compute seconds per second of audio); and the seconds to
load a checkpoint of it with ``load_embedding_model`` (architecture inferred, every tensor checked
finite) against building the model and ``torch.load`` + ``load_state_dict`` of the same file, in
the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import tempfile
import time
from pathlib import Path

import torch

from speakerlab.fileio import write_text_atomic
from speakerlab.models import build_model, count_parameters
from speakerlab.models.checkpoint import load_embedding_model, save_embedding_model

CONFIGS = {
    "eres2net_base_emb192": ("eres2net", {"m_channels": 32, "embedding_size": 192}),
    "eres2net_large_emb512": ("eres2net", {"m_channels": 64, "embedding_size": 512}),
    "eres2netv2_emb192": ("eres2netv2", {"embedding_size": 192}),
    "campplus_emb512": ("campplus", {"embedding_size": 512}),
    "ecapa_tdnn_c1024_emb192": (
        "ecapa_tdnn",
        {"channels": [1024, 1024, 1024, 1024, 3072], "embedding_size": 192},
    ),
}
SECONDS = 8.0
FRAMES = 798  # Kaldi framing of 8 s at 16 kHz: 1 + (128000 - 400) // 160


def cpu_description() -> str:
    """The CPU model and whether it has AVX-512 (from /proc/cpuinfo where there is one)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    avx512 = re.search(r"^flags\s*:.*\bavx512f\b", info, re.MULTILINE) is not None
    model = name.group(1).strip() if name else platform.machine()
    return f"{model}, {'AVX-512' if avx512 else 'no AVX-512'}"


def time_forward(model: torch.nn.Module, batch: int, repeats: int) -> float:
    x = torch.randn(batch, FRAMES, 80)
    with torch.inference_mode():
        model(x)  # warm-up: allocator and oneDNN kernel selection
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - start) / repeats


def time_load(name: str, kwargs: dict, model: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Seconds to load a checkpoint of ``model``: with ``load_embedding_model`` (architecture
    inferred, every tensor checked finite) and the plain PyTorch way (build the model, then
    ``torch.load`` + ``load_state_dict``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.ckpt"
        save_embedding_model(model, path)

        def plain() -> None:
            fresh = build_model(name, **kwargs)
            fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

        times = {}
        for key, load in (("plain", plain), ("ours", lambda: load_embedding_model(path))):
            load()  # warm-up: page cache
            start = time.perf_counter()
            for _ in range(repeats):
                load()
            times[key] = (time.perf_counter() - start) / repeats
    return {
        "seconds_plain_torch": round(times["plain"], 4),
        "seconds_load_embedding_model": round(times["ours"], 4),
        "ratio": round(times["ours"] / times["plain"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    results = {}
    for key in args.models:
        name, kwargs = CONFIGS[key]
        model = build_model(name, **kwargs).eval()
        entry = {"model": name, "kwargs": kwargs, "parameters": count_parameters(model)}
        for batch in args.batches:
            seconds = time_forward(model, batch, args.repeats)
            entry[f"batch{batch}"] = {
                "seconds_per_batch": round(seconds, 4),
                "seconds_per_utterance": round(seconds / batch, 4),
                "real_time_factor": round(seconds / batch / SECONDS, 5),
            }
        entry["load"] = time_load(name, kwargs, model, args.repeats)
        results[key] = entry
    report = {
        "benchmark": "model_forward",
        "utterance_seconds": SECONDS,
        "frames": FRAMES,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": cpu_description(),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        write_text_atomic(args.out, text + "\n")


if __name__ == "__main__":
    main()
