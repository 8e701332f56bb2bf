"""Trial lists: the one parser and writer of ``enrol_utt test_utt label`` files, and balanced
trial lists drawn from a Kaldi ``utt2spk``.

Labels: on input a trial is ``target`` or ``nontarget`` (the 3D-Speaker spelling) or ``1`` / ``0``
(the spelling of lists made by other tools); inside the toolkit a label is 1 (target) or 0
(non-target); every file the toolkit writes spells them ``target`` / ``nontarget``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speakerlab.errors import DataError
from speakerlab.fileio import atomic_write

LABELS: dict[str, int] = {"target": 1, "nontarget": 0, "1": 1, "0": 0}
LABEL_WORDS = ("nontarget", "target")  # indexed by the label
FORMAT = "'enrol_utt test_utt label' (label target/nontarget or 1/0)"


@dataclass
class Trials:
    """A trial list: parallel enrol/test ids, labels (1 target, 0 non-target) and the 1-based
    line number of each trial in ``path`` (for error messages)."""

    path: Path
    enrol: list[str]
    test: list[str]
    labels: np.ndarray
    line_numbers: np.ndarray

    @property
    def name(self) -> str:
        """The list's name: its file name (``trials_cross_device`` -> score file stem)."""
        return self.path.name

    @property
    def num_targets(self) -> int:
        return int(np.count_nonzero(self.labels))

    def __len__(self) -> int:
        return len(self.enrol)

    def subset(self, keep: np.ndarray) -> Trials:
        """The trials where the boolean mask ``keep`` is true (line numbers kept)."""
        rows = np.flatnonzero(keep).tolist()
        return Trials(
            path=self.path,
            enrol=[self.enrol[i] for i in rows],
            test=[self.test[i] for i in rows],
            labels=self.labels[rows],
            line_numbers=self.line_numbers[rows],
        )


def _fields_per_line(text: str) -> np.ndarray:
    """Number of whitespace-separated fields on each newline-separated line of ``text``.

    ASCII text (the usual case) is counted with array operations over its bytes, which is many
    times faster than splitting a million lines one by one.
    """
    if not text:
        return np.zeros(1, dtype=np.int64)
    if not text.isascii():
        return np.array([len(line.split()) for line in text.split("\n")], dtype=np.int64)
    data = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    # ASCII whitespace for str.split(): bytes 9-13 and 28-32 (uint8 wrap-around makes each
    # range test a single comparison).
    in_field = ~((data - np.uint8(9) <= 4) | (data - np.uint8(28) <= 4))
    field_starts = np.flatnonzero(in_field[1:] > in_field[:-1]) + 1
    if in_field[0]:
        field_starts = np.concatenate(([0], field_starts))
    newlines = np.flatnonzero(data == 10)
    # The line of a field is the number of newlines before its first character.
    return np.bincount(np.searchsorted(newlines, field_starts), minlength=newlines.size + 1)


def read_trials(path: str | Path) -> Trials:
    """Read a trial list (see the module docstring for the labels). Empty lines are skipped.

    A line with another number of fields or an unknown label raises a :class:`DataError` naming
    the file and line; so does an empty list.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: trial list not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read trial list ({err})") from None

    fields = _fields_per_line(text)
    bad = np.flatnonzero((fields != 3) & (fields != 0))
    if bad.size:
        line = text.split("\n")[bad[0]]
        raise DataError(
            f"{path}:{bad[0] + 1}: expected {FORMAT}, got {fields[bad[0]]} fields: {line.strip()!r}"
        )
    line_numbers = np.flatnonzero(fields) + 1
    if line_numbers.size == 0:
        raise DataError(f"{path}: trial list is empty")
    # Every non-blank line has exactly three fields, so the token stream is (enrol, test, label)*.
    tokens = text.split()
    enrol, test, label_words = tokens[0::3], tokens[1::3], tokens[2::3]

    unknown = set(label_words) - LABELS.keys()
    if unknown:
        first = next(i for i, word in enumerate(label_words) if word in unknown)
        raise DataError(
            f"{path}:{line_numbers[first]}: expected {FORMAT}, got label {label_words[first]!r}"
        )
    labels = np.fromiter(
        map(LABELS.__getitem__, label_words), dtype=np.int8, count=len(tokens) // 3
    )
    return Trials(path=path, enrol=enrol, test=test, labels=labels, line_numbers=line_numbers)


def write_trials(path: str | Path, trials: Trials) -> Path:
    """Write ``enrol test target|nontarget`` lines, atomically."""
    words = [LABEL_WORDS[label] for label in trials.labels.tolist()]
    with atomic_write(path) as f:
        f.writelines(map("{} {} {}\n".format, trials.enrol, trials.test, words))
    return Path(path)


# --------------------------------------------------------------------------- balanced lists


def _unordered_pairs(count: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``index``-th pair ``(i, j)``, ``i < j``, among ``count`` items, pairs ordered by
    ``j`` then ``i``: pair ``m`` has ``j(j-1)/2 <= m < j(j+1)/2`` and ``i = m - j(j-1)/2``."""
    j = np.floor((1 + np.sqrt(1 + 8 * index.astype(np.float64))) / 2).astype(np.int64)
    j -= j * (j - 1) // 2 > index  # the square root may round up ...
    j += (j + 1) * j // 2 <= index  # ... or down by one near a boundary
    i = index - j * (j - 1) // 2
    assert np.all((0 <= i) & (i < j) & (j < count))
    return i, j


def balanced_trials(
    utt2spk: Mapping[str, str], num_targets: int, seed: int = 0, path: str | Path = "trials"
) -> Trials:
    """A trial list of up to ``num_targets`` target trials (distinct pairs of different
    utterances of one speaker, drawn uniformly from all such pairs) and as many non-target
    trials (distinct pairs of utterances of different speakers, drawn uniformly), in random
    order. Deterministic for a given ``utt2spk`` and ``seed``; fewer trials when the speakers
    have fewer target pairs."""
    if num_targets < 1:
        raise ValueError(f"num_targets must be at least 1, got {num_targets}")
    utts = sorted(utt2spk)
    speakers, spk_of_utt = np.unique([utt2spk[u] for u in utts], return_inverse=True)
    if len(speakers) < 2:
        raise DataError(f"a trial list needs at least 2 speakers, got {len(speakers)}")
    # Utterances grouped by speaker: order[starts[s] : starts[s] + counts[s]] are speaker s's.
    order = np.argsort(spk_of_utt, kind="stable")
    counts = np.bincount(spk_of_utt, minlength=len(speakers))
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    pairs_per_speaker = counts * (counts - 1) // 2
    pair_offsets = np.concatenate(([0], np.cumsum(pairs_per_speaker)))
    total_targets = int(pair_offsets[-1])
    if total_targets == 0:
        raise DataError("no speaker has two utterances: no target trial can be made")

    rng = np.random.default_rng(seed)
    num_targets = min(num_targets, total_targets)
    picked = np.sort(rng.choice(total_targets, size=num_targets, replace=False))
    speaker = np.searchsorted(pair_offsets, picked, side="right") - 1
    i, j = _unordered_pairs(counts[speaker], picked - pair_offsets[speaker])
    target_pairs = np.stack([order[starts[speaker] + i], order[starts[speaker] + j]], axis=1)

    nontarget_pairs = _nontarget_pairs(spk_of_utt, num_targets, rng)
    pairs = np.concatenate([target_pairs, nontarget_pairs])
    labels = np.repeat(np.array([1, 0], dtype=np.int8), [num_targets, len(nontarget_pairs)])
    shuffle = rng.permutation(len(pairs))
    pairs, labels = pairs[shuffle], labels[shuffle]
    return Trials(
        path=Path(path),
        enrol=[utts[k] for k in pairs[:, 0].tolist()],
        test=[utts[k] for k in pairs[:, 1].tolist()],
        labels=labels,
        line_numbers=np.arange(1, len(pairs) + 1),
    )


def _nontarget_pairs(spk_of_utt: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct unordered pairs ``(a, b)``, ``a < b``, of utterances of different
    speakers, drawn uniformly (rejection sampling: a random pair is a non-target one with
    probability at least 1/2 when there are two or more speakers)."""
    num_utts = len(spk_of_utt)
    counts = np.bincount(spk_of_utt)
    available = (num_utts * num_utts - int(np.sum(counts * counts))) // 2
    if count > available:
        raise DataError(f"only {available} non-target pairs exist, {count} were asked for")
    found = np.empty((0, 2), dtype=np.int64)
    while len(found) < count:
        draws = rng.integers(0, num_utts, size=(2 * (count - len(found)) + 16, 2))
        draws = draws[spk_of_utt[draws[:, 0]] != spk_of_utt[draws[:, 1]]]
        draws.sort(axis=1)
        merged = np.concatenate([found, draws])
        # Keep the first occurrence of each pair, in draw order (np.unique sorts).
        _, first = np.unique(merged[:, 0] * num_utts + merged[:, 1], return_index=True)
        found = merged[np.sort(first)][:count]
    return found
