"""Speaker identification (1:N): a database of enrolled speakers and the search over it.

    >>> db = SpeakerDB.create(model_identity(model), dim=192, model_source=model)
    >>> db.enroll("alice", verifier.embed_many(["alice_1.wav", "alice_2.wav"], normalize=True))
    >>> db.save("speakers.db")
    >>> SpeakerDB.load("speakers.db").identify(verifier.embed("who.wav", normalize=True))

A speaker is the mean of the unit-length embeddings of its recordings, kept as its direction and
length, and how many recordings there were, so that enrolling more later updates the mean
exactly. Search is exact: one product of the query with the matrix of the speakers' directions
(unit-length means), then a partial sort for the top k.

The database records the identity of the model that made its embeddings: a digest of the model's
weights (:func:`model_identity`), so that embeddings of two models are never compared; enrolling
or identifying with another model is refused.

File format: one ``.npz`` archive read with ``allow_pickle=False`` (no code can run on loading),
holding ``header`` (UTF-8 JSON: format, version, model identity and source, dimension, speaker
names), ``directions`` (float32, speakers x dim), ``lengths`` (float32) and ``counts`` (int64).
It is written atomically (a temporary file renamed into place), so a kill never leaves a
half-written database; :func:`updating` holds an exclusive lock while it reads, changes and
writes one, so two processes enrolling into the same file never lose each other's speakers.
"""

from __future__ import annotations

import contextlib
import json
import struct
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from speakerlab.errors import ConfigError, DataError
from speakerlab.fileio import atomic_write, exclusive_lock, file_digest, tensors_digest

FORMAT = "speakerlab-speaker-db"
VERSION = 1
LOCK_WAIT_SECONDS = 60.0
DEFAULT_TOP_K = 5
_LOCAL_HEADER_SIZE = 30  # bytes of a zip entry's local header before its name and extra field


def model_identity(source: str | Path) -> str:
    """A digest of a model's weights: ``weights:<sha256>`` of the embedding model's tensors for
    checkpoints and registry ids (whatever the file layout; BatchNorm's batch counters, which do
    not change embeddings, left out), ``onnx:<sha256>`` of the file for ONNX models."""
    from speakerlab.models.checkpoint import read_model_state
    from speakerlab.pretrained import download_pretrained

    if str(source).endswith(".onnx"):
        if not Path(source).is_file():
            raise ConfigError(f"{source}: ONNX model not found")
        return "onnx:" + file_digest(source)
    path = Path(source)
    if not path.is_file():
        path = download_pretrained(str(source))  # a registry id (unknown ones are an error)
    state, _, _ = read_model_state(path)
    weights = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return "weights:" + tensors_digest(weights)


@dataclass(frozen=True)
class Match:
    """One candidate speaker of an identification and its cosine score."""

    speaker: str
    score: float


@dataclass(frozen=True)
class Identification:
    """The top candidates (best first) and the answer: the best speaker when its score reaches
    the threshold, else None (an unknown speaker)."""

    matches: list[Match]
    threshold: float

    @property
    def speaker(self) -> str | None:
        best = self.matches[0] if self.matches else None
        return best.speaker if best is not None and best.score >= self.threshold else None


class SpeakerDB:
    """Enrolled speakers of one model (see the module docstring)."""

    def __init__(
        self,
        model: str,
        names: Sequence[str],
        means: np.ndarray,
        counts: np.ndarray,
        model_source: str = "",
    ) -> None:
        self.model = model
        self.model_source = model_source
        means = np.asarray(means, np.float32)
        lengths = np.linalg.norm(means, axis=1)
        if not np.all(np.isfinite(lengths) & (lengths > 0)):
            raise DataError("a speaker's mean embedding is zero or not finite")
        self._set(list(names), means / lengths[:, None], lengths, np.asarray(counts, np.int64))

    def _set(
        self, names: list[str], directions: np.ndarray, lengths: np.ndarray, counts: np.ndarray
    ) -> None:
        # A mean is kept as its direction (what search uses, so loading needs no pass over the
        # matrix) and its length (for exact running means). Storage grows by doubling, so that
        # enrolling speakers one by one costs linear time.
        self.names = names
        self._directions = np.asarray(directions, np.float32)
        self._lengths = np.asarray(lengths, np.float32)
        self._counts = counts
        self._rows = {name: row for row, name in enumerate(names)}

    @property
    def directions(self) -> np.ndarray:
        """Unit-length mean embedding of each speaker (speakers x dim): what search compares."""
        return self._directions[: len(self.names)]

    @property
    def means(self) -> np.ndarray:
        """Mean of the unit-length embeddings of each speaker's recordings (speakers x dim)."""
        return self.directions * self._lengths[: len(self.names), None]

    @property
    def counts(self) -> np.ndarray:
        """Number of recordings enrolled for each speaker."""
        return self._counts[: len(self.names)]

    @classmethod
    def create(cls, model: str, dim: int, model_source: str = "") -> SpeakerDB:
        """An empty database for embeddings of ``dim`` dimensions made by ``model``."""
        return cls(model, [], np.zeros((0, dim), np.float32), np.zeros(0, np.int64), model_source)

    @property
    def dim(self) -> int:
        return self._directions.shape[1]

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._rows

    def check_model(self, model: str, source: str = "this model") -> None:
        """Refuse embeddings of a model other than the database's."""
        if model != self.model:
            raise ConfigError(
                f"the speaker database holds embeddings of another model "
                f"({self.model_source or self.model[:20]}, {self.model[:20]}...) than "
                f"{source} ({model[:20]}...); embeddings of two models cannot be compared"
            )

    # ----------------------------------------------------------------- changes

    def enroll(self, name: str, embeddings: np.ndarray, replace: bool = False) -> None:
        """Add the recordings' ``embeddings`` (n, dim) to speaker ``name`` (created if new;
        with ``replace``, its earlier recordings are forgotten)."""
        check_name(name)
        embeddings = _unit_rows(np.atleast_2d(np.asarray(embeddings, dtype=np.float64)))
        if embeddings.shape[1] != self.dim:
            raise ConfigError(
                f"embeddings have {embeddings.shape[1]} dimensions, the database {self.dim}"
            )
        row = self._rows.get(name)
        old = 0 if row is None or replace else int(self._counts[row])
        mean = embeddings.sum(axis=0)
        if old:
            mean += self._directions[row] * (float(self._lengths[row]) * old)
        mean /= old + len(embeddings)
        length = float(np.linalg.norm(mean))
        if not length > 0:
            raise DataError(f"the mean embedding of {name!r} would be zero")
        if row is None:
            row = self._append(name)
        self._directions[row], self._lengths[row] = mean / length, length
        self._counts[row] = old + len(embeddings)

    def _append(self, name: str) -> int:
        row = len(self.names)
        if row == len(self._directions):
            capacity = max(16, 2 * row)
            directions = np.zeros((capacity, self.dim), np.float32)
            lengths, counts = np.zeros(capacity, np.float32), np.zeros(capacity, np.int64)
            directions[:row], lengths[:row], counts[:row] = (
                self.directions,
                self._lengths[:row],
                self.counts,
            )
            self._directions, self._lengths, self._counts = directions, lengths, counts
        self.names.append(name)
        self._rows[name] = row
        return row

    def remove(self, names: Sequence[str]) -> None:
        """Remove speakers; an unknown name is an error (and nothing is removed)."""
        unknown = [name for name in names if name not in self._rows]
        if unknown:
            raise DataError(f"not in the speaker database: {', '.join(map(repr, unknown))}")
        keep = np.ones(len(self), dtype=bool)
        keep[[self._rows[name] for name in names]] = False
        kept_names = [name for name, kept in zip(self.names, keep) if kept]
        lengths = self._lengths[: len(self.names)]
        self._set(kept_names, self.directions[keep], lengths[keep], self.counts[keep])

    # ----------------------------------------------------------------- search

    def identify(
        self, embeddings: np.ndarray, top_k: int = DEFAULT_TOP_K, threshold: float = 0.0
    ) -> list[Identification]:
        """The ``top_k`` closest speakers of each embedding (one per row of ``embeddings``, or a
        single vector), by cosine score, best first."""
        if len(self) == 0:
            raise DataError("the speaker database is empty: enroll speakers first")
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {top_k}")
        queries = _unit_rows(np.atleast_2d(np.asarray(embeddings, dtype=np.float32)))
        if queries.shape[1] != self.dim:
            raise ConfigError(
                f"embeddings have {queries.shape[1]} dimensions, the database {self.dim}"
            )
        queries = queries.astype(np.float32)
        if len(queries) == 1:  # a matrix-vector product: faster than a 1-row matrix product
            scores = (self.directions @ queries[0])[None, :]
        else:
            scores = queries @ self.directions.T  # (queries, speakers)
        k = min(top_k, len(self))
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        top_scores = np.take_along_axis(top_scores, order, 1)
        return [
            Identification(
                [Match(self.names[i], float(s)) for i, s in zip(rows.tolist(), vals.tolist())],
                threshold,
            )
            for rows, vals in zip(top, top_scores)
        ]

    # ----------------------------------------------------------------- files

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "model_source": self.model_source,
            "dim": self.dim,
            "names": self.names,
        }

    def save(self, path: str | Path) -> Path:
        """Write the database atomically."""
        header = np.frombuffer(json.dumps(self.header()).encode("utf-8"), dtype=np.uint8)
        with atomic_write(path, "wb") as handle:
            np.savez(
                handle,
                header=header,
                directions=self.directions,
                lengths=self._lengths[: len(self.names)],
                counts=self.counts,
            )
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> SpeakerDB:
        """Read and check a database written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: speaker database not found")
        try:
            with np.load(path, allow_pickle=False) as archive:
                header = json.loads(archive["header"].tobytes().decode("utf-8"))
                _check_header(header, path)
                directions = _mapped_member(path, archive.zip, "directions")
                lengths, counts = archive["lengths"], archive["counts"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not a readable speaker database ({err})") from None
        num = len(header["names"])
        if (
            directions.shape != (num, header["dim"])
            or lengths.shape != (num,)
            or counts.shape != (num,)
            or directions.dtype != np.float32
        ):
            raise DataError(f"{path}: speaker database is inconsistent (names and arrays)")
        if not (np.all(np.isfinite(directions)) and np.all(lengths > 0) and np.all(counts > 0)):
            raise DataError(f"{path}: speaker database holds invalid embeddings or counts")
        db = cls.create(header["model"], header["dim"], header.get("model_source", ""))
        db._set(header["names"], directions, lengths, counts)
        return db


def _mapped_member(path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """Array ``name`` of the uncompressed archive at ``path``, memory-mapped copy-on-write: no
    copy through the zip reader (whose chunked reads dominate loading a large database)."""
    info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{name} is compressed")
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local_header = handle.read(_LOCAL_HEADER_SIZE)
        if local_header[:4] != b"PK\x03\x04":
            raise ValueError(f"{name}: bad zip entry")
        name_length, extra_length = struct.unpack("<HH", local_header[26:30])
        handle.seek(info.header_offset + _LOCAL_HEADER_SIZE + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(handle)
        offset = handle.tell()
    if fortran_order or dtype.hasobject:
        raise ValueError(f"{name}: unexpected array layout")
    if offset + dtype.itemsize * int(np.prod(shape)) > path.stat().st_size:
        raise ValueError(f"{name}: the file is shorter than the array")
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)


def _check_header(header: Any, path: Path) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DataError(f"{path}: not a speaker database of speakerlab")
    if header.get("version") != VERSION:
        raise DataError(f"{path}: speaker database version {header.get('version')} unknown")
    names = header.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: speaker database names are not a list of strings")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: speaker database names a speaker twice")
    if not isinstance(header.get("dim"), int) or not isinstance(header.get("model"), str):
        raise DataError(f"{path}: speaker database header lacks its dimension or model")


@contextlib.contextmanager
def updating(
    path: str | Path, model: str, dim: int, model_source: str = "", create: bool = True
) -> Iterator[SpeakerDB]:
    """Read the database at ``path`` (a new one when missing and ``create``), let the block
    change it, and write it back, all under an exclusive lock (waits up to
    ``LOCK_WAIT_SECONDS`` for another writer). The database must belong to ``model``."""
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    with exclusive_lock(lock, what=f"speaker database {path}", wait_seconds=LOCK_WAIT_SECONDS):
        if path.exists() or not create:
            db = SpeakerDB.load(path)
            db.check_model(model, model_source or "this model")
        else:
            db = SpeakerDB.create(model, dim, model_source)
        yield db
        db.save(path)


def check_name(name: str) -> None:
    """A speaker name is printable text without surrounding spaces or line breaks."""
    if not name or name != name.strip() or not name.isprintable():
        raise ConfigError(
            f"speaker name {name!r} must be non-empty printable text without leading or "
            "trailing spaces"
        )


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; a zero or non-finite row is an error."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise DataError("an embedding is zero or not finite")
    return matrix / norms
