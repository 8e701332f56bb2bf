"""Whole-utterance embedding extraction of a ``wav.scp`` into Kaldi ark/scp.

Batching rule: a batch only holds utterances with exactly the same number of fbank frames.
Nothing is padded or cropped, so every embedding equals the one computed for the utterance alone
(padding would change the statistics pooling). Utterances are sorted by (frames, id) and each run
of equal frame counts is cut into batches of at most ``batch_size`` utterances and
``max_batch_frames`` frames; on corpora of fixed-length recordings almost every batch is full.

Parallelism: under ``torchrun`` each rank takes every ``world_size``-th batch and writes its own
part (``parts/part-RRR-of-WWW.{ark,scp}``); rank 0 merges the parts into
``<out_dir>/embedding.{ark,scp}`` (keys in ``wav.scp`` order) once every rank is done.

Resume: parts are appended to batch by batch, the ark flushed before its scp lines, so a complete
scp line always points at a complete embedding. A restarted run skips every utterance that has a
complete line in any part (or in an earlier ``embedding.scp``) and goes on with the rest.

Determinism: the model runs in eval mode under ``torch.inference_mode`` and fbank uses no dither,
so the same audio always gives the same embedding (to float rounding across batch sizes).
"""

from __future__ import annotations

import io
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import kaldiio
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from speakerlab.audio import SAMPLE_RATE, audio_info, load_audio
from speakerlab.data.kaldi_dir import read_wav_scp
from speakerlab.distributed import DistContext, barrier, single_process
from speakerlab.errors import AudioError, ConfigError, DataError
from speakerlab.features import fbank, num_frames

EMBEDDING_NAME = "embedding"
PARTS_DIR = "parts"
MODEL_TAG_FILE = "model_tag"
_MAX_LISTED = 10
_PROBE_MAX_FRAMES = 200  # 2 s: a model that needs more is of no use for verification


# --------------------------------------------------------------------------- embedders


class Embedder(ABC):
    """Maps fbank ``(batch, frames, feat_dim)`` to embeddings ``(batch, dim)`` (numpy float32).

    Subclasses implement :meth:`embed_features`; :attr:`min_frames` is the shortest input the
    model turns into finite embeddings, found once by probing.
    """

    feat_dim: int = 80
    _min_frames: int | None = None

    @abstractmethod
    def embed_features(self, feats: torch.Tensor) -> np.ndarray:
        """Embeddings ``(batch, dim)`` of fbank ``(batch, frames, feat_dim)``."""

    def __call__(self, feats: torch.Tensor) -> np.ndarray:
        return self.embed_features(feats)

    def _accepts(self, frames: int) -> bool:
        probe = torch.randn(1, frames, self.feat_dim, generator=torch.Generator().manual_seed(0))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "degrees of freedom <= 0" from pooling
                return bool(np.all(np.isfinite(self.embed_features(probe))))
        except Exception:  # too-short inputs fail inside the model (padding, pooling, reshapes)
            return False

    @property
    def min_frames(self) -> int:
        """Smallest frame count giving a finite embedding (binary search; inputs this short are
        rejected by every model in the zoo in a way that only depends on the length)."""
        if self._min_frames is None:
            if not self._accepts(_PROBE_MAX_FRAMES):
                raise ConfigError(
                    f"the model gives no finite embedding even for "
                    f"{_PROBE_MAX_FRAMES} frames of input"
                )
            low, high = 1, _PROBE_MAX_FRAMES  # high is accepted
            while low < high:
                middle = (low + high) // 2
                if self._accepts(middle):
                    high = middle
                else:
                    low = middle + 1
            self._min_frames = high
        return self._min_frames


class TorchEmbedder(Embedder):
    """A PyTorch embedding model in eval mode on ``device``."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.feat_dim = int(getattr(model, "feat_dim", 80))

    def embed_features(self, feats: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(feats.to(self.device, non_blocking=True))
        return out.float().cpu().numpy()


# --------------------------------------------------------------------------- utterances


@dataclass(frozen=True)
class Utterance:
    """One ``wav.scp`` entry with its fbank frame count (from the audio header)."""

    utt: str
    path: str
    num_frames: int


def scan_wav_scp(wav_scp: str | Path, min_frames: int = 1) -> list[Utterance]:
    """Read ``wav.scp`` and every file's header; fail before any work if some file is
    unreadable, not 16 kHz or shorter than ``min_frames`` frames (all such files are listed)."""
    table = read_wav_scp(wav_scp)
    if not table:
        raise DataError(f"{wav_scp}: no utterances")
    utterances, problems = [], []
    for utt, path in table.items():
        try:
            info = audio_info(path)
        except AudioError as err:
            problems.append(f"{utt}: {err}")
            continue
        frames = num_frames(info.frames)
        if info.samplerate != SAMPLE_RATE:
            problems.append(
                f"{utt}: {path}: sample rate is {info.samplerate} Hz, expected {SAMPLE_RATE} Hz"
            )
        elif info.frames == 0:
            problems.append(f"{utt}: {path}: audio is empty")
        elif frames < min_frames:
            problems.append(
                f"{utt}: {path}: {info.frames / SAMPLE_RATE:.3f} s gives {frames} "
                f"frames, the model needs at least {min_frames}"
            )
        else:
            utterances.append(Utterance(utt, path, frames))
    if problems:
        more = (
            f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        )
        raise AudioError(
            f"{wav_scp}: {len(problems)} unusable recording(s):\n  "
            + "\n  ".join(problems[:_MAX_LISTED])
            + more
        )
    return utterances


def make_batches(
    utterances: Sequence[Utterance], batch_size: int, max_batch_frames: int
) -> list[list[Utterance]]:
    """Batches of utterances with identical frame counts (see the module docstring)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    ordered = sorted(utterances, key=lambda u: (u.num_frames, u.utt))
    batches: list[list[Utterance]] = []
    for utt in ordered:
        current = batches[-1] if batches else None
        fits = (
            current is not None
            and current[0].num_frames == utt.num_frames
            and len(current) < batch_size
            and (len(current) + 1) * utt.num_frames <= max_batch_frames
        )
        if fits:
            current.append(utt)
        else:
            batches.append([utt])
    return batches


class BatchFeatures(Dataset):
    """Dataset of whole batches: item ``i`` is (utterance ids, fbank ``(batch, frames, bins)``)."""

    def __init__(self, batches: Sequence[Sequence[Utterance]], num_mel_bins: int = 80) -> None:
        self.batches = batches
        self.num_mel_bins = num_mel_bins

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[list[str], torch.Tensor]:
        feats = []
        for utt in self.batches[index]:
            feat = fbank(load_audio(utt.path), num_mel_bins=self.num_mel_bins)
            if feat.shape[0] != utt.num_frames:  # a header that lies about the length
                raise AudioError(
                    f"{utt.path}: header promises {utt.num_frames} frames, the "
                    f"audio gives {feat.shape[0]}"
                )
            feats.append(feat)
        return [u.utt for u in self.batches[index]], torch.stack(feats)


# --------------------------------------------------------------------------- ark/scp parts


def complete_scp_lines(path: Path) -> list[str]:
    """Lines of an scp that were written completely (newline-terminated ``key ark:offset``)."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]  # the piece after the last newline is unfinished
    return [line for line in lines if len(line.split()) == 2 and ":" in line.split()[1]]


def finished_utterances(out_dir: Path) -> set[str]:
    """Utterances with an embedding in the merged scp or a complete line of any part."""
    done = {line.split()[0] for line in complete_scp_lines(out_dir / f"{EMBEDDING_NAME}.scp")}
    for scp in sorted((out_dir / PARTS_DIR).glob("part-*.scp")):
        done.update(line.split()[0] for line in complete_scp_lines(scp))
    return done


class PartWriter:
    """Appends embeddings to this rank's ark/scp part; flushes the ark before the scp so a
    complete scp line always refers to a complete ark entry."""

    def __init__(self, out_dir: Path, rank: int, world_size: int) -> None:
        parts = out_dir / PARTS_DIR
        parts.mkdir(parents=True, exist_ok=True)
        stem = parts / f"part-{rank:03d}-of-{world_size:03d}"
        self.ark_path = str(stem.with_suffix(".ark").resolve())  # absolute: scp lines name it
        self.scp_path = stem.with_suffix(".scp")
        self._drop_unfinished_scp_line()
        self._ark = open(self.ark_path, "ab")
        self._scp = open(self.scp_path, "a", encoding="utf-8")

    def _drop_unfinished_scp_line(self) -> None:
        """Cut an scp interrupted mid-line back to its last complete line (the ark may keep
        a partial entry at its end: nothing points to it and appends go after it)."""
        if self.scp_path.is_file():
            data = self.scp_path.read_bytes()
            self.scp_path.write_bytes(data[: data.rfind(b"\n") + 1])

    def write(self, utts: Sequence[str], embeddings: np.ndarray) -> None:
        scp_lines = io.StringIO()
        kaldiio.save_ark(self._ark, {u: e for u, e in zip(utts, embeddings)}, scp=scp_lines)
        self._ark.flush()
        self._scp.write(scp_lines.getvalue())
        self._scp.flush()

    def close(self) -> None:
        self._ark.close()
        self._scp.close()


def merge_parts(out_dir: Path, keys: Sequence[str]) -> Path:
    """Write ``embedding.{ark,scp}`` with ``keys`` in order from the parts and any earlier
    merged file, replace the old files atomically and delete the parts."""
    sources: dict[str, str] = {}
    old_scp = out_dir / f"{EMBEDDING_NAME}.scp"
    part_scps = sorted((out_dir / PARTS_DIR).glob("part-*.scp"))
    for scp in [old_scp, *part_scps]:
        for line in complete_scp_lines(scp):
            key, location = line.split()
            sources[key] = location
    missing = [k for k in keys if k not in sources]
    if missing:
        raise DataError(
            f"{out_dir}: {len(missing)} utterance(s) have no embedding after "
            f"extraction, e.g. {missing[:_MAX_LISTED]}"
        )
    ark = (out_dir / f"{EMBEDDING_NAME}.ark").resolve()
    tmp_ark, tmp_scp = ark.with_name(ark.name + ".tmp"), old_scp.with_name(old_scp.name + ".tmp")
    scp_lines = []
    with open(tmp_ark, "wb") as ark_file:
        for key in keys:
            vector = kaldiio.load_mat(sources[key])
            # An ark entry is "<key> <binary matrix>": the scp offset points just past the space.
            scp_lines.append(f"{key} {ark}:{ark_file.tell() + len(key.encode()) + 1}\n")
            kaldiio.save_ark(ark_file, {key: vector})
    tmp_scp.write_text("".join(scp_lines), encoding="utf-8")
    tmp_ark.replace(ark)
    tmp_scp.replace(old_scp)
    for scp in part_scps:
        scp.with_suffix(".ark").unlink(missing_ok=True)
        scp.unlink()
    if (out_dir / PARTS_DIR).is_dir() and not any((out_dir / PARTS_DIR).iterdir()):
        (out_dir / PARTS_DIR).rmdir()
    return old_scp


# --------------------------------------------------------------------------- extraction


def iterate_batches(
    batches: Sequence[Sequence[Utterance]], num_mel_bins: int, num_workers: int
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(ids, fbank batch) in order; audio reading and fbank run in ``num_workers`` processes."""
    loader = DataLoader(
        BatchFeatures(batches, num_mel_bins),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    yield from loader


def check_model_tag(out_dir: Path, model_tag: str) -> bool:
    """Refuse to resume ``out_dir`` with another model than the one that started it (the
    embeddings of two models must never be mixed). True when no tag is recorded yet."""
    tag_file = out_dir / MODEL_TAG_FILE
    if not tag_file.is_file():
        return True
    recorded = tag_file.read_text(encoding="utf-8").strip()
    if recorded != model_tag:
        raise ConfigError(
            f"{out_dir} holds embeddings of model {recorded!r}, not {model_tag!r}; "
            "use another output directory or delete it"
        )
    return False


def extract_embeddings(
    wav_scp: str | Path,
    embedder: Embedder,
    out_dir: str | Path,
    *,
    batch_size: int = 16,
    max_batch_frames: int = 16000,
    num_workers: int = 0,
    ranks: DistContext | None = None,
    progress: bool = True,
    model_tag: str | None = None,
) -> Path:
    """Embed every utterance of ``wav_scp`` into ``<out_dir>/embedding.scp`` (+ ``.ark``).

    Resumes an interrupted run in ``out_dir``; ``model_tag`` (e.g. the model's path) guards
    against resuming with a different model. Under torchrun pass the context of
    :func:`speakerlab.distributed.init_distributed`; every
    rank must call this with the same arguments. Returns the path of ``embedding.scp``.
    """
    ranks = ranks or single_process()
    out_dir = Path(out_dir)
    utterances = scan_wav_scp(wav_scp, embedder.min_frames)
    keys = [u.utt for u in utterances]

    # Every rank reads the finished set before any rank writes, so all shard the same list.
    new_tag = model_tag is not None and check_model_tag(out_dir, model_tag)
    done = finished_utterances(out_dir)
    barrier(ranks)
    if new_tag and ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MODEL_TAG_FILE).write_text(f"{model_tag}\n", encoding="utf-8")
    todo = [u for u in utterances if u.utt not in done]
    my_batches = make_batches(todo, batch_size, max_batch_frames)[ranks.rank :: ranks.world_size]

    if my_batches:
        writer = PartWriter(out_dir, ranks.rank, ranks.world_size)
        bar = tqdm(
            total=sum(map(len, my_batches)),
            unit="utt",
            desc="extract",
            disable=not (progress and ranks.is_main),
            dynamic_ncols=True,
        )
        try:
            for utts, feats in iterate_batches(my_batches, embedder.feat_dim, num_workers):
                writer.write(utts, embedder(feats))
                bar.update(len(utts))
        finally:
            writer.close()
            bar.close()

    barrier(ranks)
    scp = out_dir / f"{EMBEDDING_NAME}.scp"
    if ranks.is_main and (todo or _scp_keys(scp) != keys):
        merge_parts(out_dir, keys)
    barrier(ranks)
    return scp


def _scp_keys(scp: Path) -> list[str]:
    return [line.split()[0] for line in complete_scp_lines(scp)]


def read_embeddings(scp: str | Path) -> dict[str, np.ndarray]:
    """All embeddings of an scp, in file order."""
    return {key: np.asarray(vector) for key, vector in kaldiio.load_scp_sequential(str(scp))}
