"""Trial lists: the one parser (labels, errors naming file and line), the writer, balanced lists
drawn from an utt2spk and the make-trials command (held-out speakers)."""

import itertools
from collections import Counter

import numpy as np
import pytest

from speakerlab.bin import make_trials as make_trials_cli
from speakerlab.data.kaldi_dir import read_table
from speakerlab.errors import DataError
from speakerlab.trials import (
    _fields_per_line,
    _unordered_pairs,
    balanced_trials,
    read_trials,
    write_trials,
)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_read_trials_accepts_both_label_styles_and_skips_blank_lines(tmp_path):
    path = write_lines(
        tmp_path / "trials", ["a1 a2 target", "", "a1 b1 nontarget", "a2 b2 1", "  b1 b2   0  "]
    )
    trials = read_trials(path)
    assert trials.enrol == ["a1", "a1", "a2", "b1"]
    assert trials.test == ["a2", "b1", "b2", "b2"]
    assert trials.labels.tolist() == [1, 0, 1, 0]
    assert trials.line_numbers.tolist() == [1, 3, 4, 5]
    assert trials.name == "trials" and trials.num_targets == 2


def test_written_lists_spell_labels_one_way_and_read_back(tmp_path):
    trials = read_trials(write_lines(tmp_path / "in", ["a b 1", "a c 0", "b c target"]))
    write_trials(tmp_path / "out", trials)
    assert (tmp_path / "out").read_text() == "a b target\na c nontarget\nb c target\n"
    again = read_trials(tmp_path / "out")
    assert again.enrol == trials.enrol and again.labels.tolist() == trials.labels.tolist()
    subset = trials.subset(np.array([False, True, True]))
    assert subset.test == ["c", "c"] and subset.line_numbers.tolist() == [2, 3]


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ["a1 a2 target", "a1 b1"],
            r"trials:2: expected 'enrol_utt test_utt label' .* got 2 fields",
        ),
        (["a1 a2 target", "a1 b1 nontarget extra"], r"trials:2: expected .* got 4 fields"),
        (["a1 a2 target", "", "a1 b1 maybe"], r"trials:3: expected .* got label 'maybe'"),
        ([""], r"trials: trial list is empty"),
    ],
)
def test_malformed_trial_lines_name_the_line(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        read_trials(write_lines(tmp_path / "trials", lines))


def test_field_counting_agrees_with_str_split():
    rng = np.random.default_rng(0)
    pieces = ["a", "bb", "ccc", " ", "  ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1f"]
    for _ in range(200):
        text = "".join(rng.choice(pieces, size=rng.integers(0, 40)))
        expected = [len(line.split()) for line in text.split("\n")]
        assert _fields_per_line(text).tolist() == expected, repr(text)


def test_non_ascii_trial_lists(tmp_path):
    path = write_lines(
        tmp_path / "trials",
        ["说话人1_a 说话人1_b target", "说话人1_a\t说话人2_a   0", "说话人2_a 说话人2_b"],
    )
    with pytest.raises(DataError, match="trials:3: expected"):
        read_trials(path)
    trials = read_trials(
        write_lines(tmp_path / "ok", ["说话人1_a 说话人1_b target", "说话人1_a\t说话人2_a   0"])
    )
    assert trials.test == ["说话人1_b", "说话人2_a"] and trials.labels.tolist() == [1, 0]


def test_missing_or_binary_trial_file(tmp_path):
    with pytest.raises(DataError, match="trial list not found"):
        read_trials(tmp_path / "nope")
    (tmp_path / "binary").write_bytes(b"\xff\xfe a b 1\n")
    with pytest.raises(DataError, match="binary: cannot read trial list"):
        read_trials(tmp_path / "binary")


# --------------------------------------------------------------------------- balanced lists


def test_pair_decoding_enumerates_every_pair_once():
    for count in (2, 3, 7, 50):
        expected = sorted(itertools.combinations(range(count), 2), key=lambda p: (p[1], p[0]))
        index = np.arange(count * (count - 1) // 2)
        i, j = _unordered_pairs(np.full(index.size, count), index)
        assert list(zip(i.tolist(), j.tolist())) == expected
    # Far beyond where float64 square roots stop being exact.
    big = np.array([2**40 + 12345, 2**52 // 3])
    i, j = _unordered_pairs(np.full(2, 2**30), big)
    assert np.all(j * (j - 1) // 2 + i == big) and np.all(i < j)


def make_utt2spk(sizes):
    return {f"s{s}_u{u}": f"s{s}" for s, size in enumerate(sizes) for u in range(size)}


def test_balanced_trials_are_balanced_distinct_and_correctly_labelled():
    utt2spk = make_utt2spk([5, 6, 1, 8, 4])  # a speaker with one utterance has no target pair
    trials = balanced_trials(utt2spk, num_targets=40, seed=1)
    assert trials.num_targets == 40 and len(trials) == 80
    pairs = [frozenset(p) for p in zip(trials.enrol, trials.test)]
    assert len(set(pairs)) == len(pairs) and all(len(p) == 2 for p in pairs)
    for enrol, test, label in zip(trials.enrol, trials.test, trials.labels.tolist()):
        assert label == (utt2spk[enrol] == utt2spk[test])
    # Deterministic for a seed, different for another.
    again = balanced_trials(dict(reversed(list(utt2spk.items()))), num_targets=40, seed=1)
    assert (again.enrol, again.test) == (trials.enrol, trials.test)
    assert balanced_trials(utt2spk, 40, seed=2).enrol != trials.enrol


def test_balanced_trials_take_every_target_pair_when_asked_for_more():
    utt2spk = make_utt2spk([3, 4])  # 3 + 6 target pairs
    trials = balanced_trials(utt2spk, num_targets=1000, seed=0)
    assert trials.num_targets == 9 and len(trials) == 18


def test_target_pairs_are_drawn_uniformly():
    """Every target pair equally likely: a speaker with many utterances gets its share of pairs
    (45 of the 55 pairs here), not a share by speaker."""
    utt2spk = make_utt2spk([10, 2, 2, 2, 2, 2])  # 45 + 5 * 1 target pairs
    counts = Counter()
    for seed in range(400):
        trials = balanced_trials(utt2spk, num_targets=10, seed=seed)
        counts.update(utt2spk[e] for e, y in zip(trials.enrol, trials.labels) if y == 1)
    share = counts["s0"] / sum(counts.values())
    assert abs(share - 45 / 50) < 0.02  # 4000 draws: standard error 0.005


def test_balanced_trials_refuse_impossible_lists():
    with pytest.raises(DataError, match="at least 2 speakers"):
        balanced_trials(make_utt2spk([4]), 3)
    with pytest.raises(DataError, match="no speaker has two utterances"):
        balanced_trials(make_utt2spk([1, 1, 1]), 3)


def test_make_trials_holds_out_speakers(mini_data, tmp_path, capsys):
    out, rest = tmp_path / "calib", tmp_path / "rest"
    args = ["--data-dir", str(mini_data.train_dir), "--out-dir", str(out), "--rest-dir", str(rest)]
    make_trials_cli.main([*args, "--speakers", "3", "--max-fraction", "0.5", "--targets", "30"])
    held, kept = read_table(out / "utt2spk"), read_table(rest / "utt2spk")
    everything = read_table(mini_data.train_dir / "utt2spk")
    assert len(set(held.values())) == 3
    assert not set(held.values()) & set(kept.values())
    assert held | kept == everything
    assert set(read_table(out / "wav.scp")) == set(held)
    assert set(read_table(rest / "wav.scp")) == set(kept)
    assert set(read_table(rest / "spk2utt")) == set(kept.values())
    trials = read_trials(out / "trials")
    assert trials.num_targets == 30 and len(trials) == 60
    assert set(trials.enrol) | set(trials.test) <= set(held)
    assert "3 of 12 speakers" in capsys.readouterr().err
    # The same command again gives the same files.
    first = (out / "trials").read_bytes()
    make_trials_cli.main([*args, "--speakers", "3", "--max-fraction", "0.5", "--targets", "30"])
    assert (out / "trials").read_bytes() == first


def test_make_trials_caps_the_held_out_fraction(mini_data, tmp_path, capsys):
    out = tmp_path / "calib"
    args = ["--data-dir", str(mini_data.train_dir), "--out-dir", str(out)]
    make_trials_cli.main([*args, "--speakers", "5"])  # 10 % of 12 speakers: 1, raised to 4
    assert len(set(read_table(out / "utt2spk").values())) == 4
    assert "4 of 12 speakers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_trials_cli.main([*args, "--speakers", "1", "--out-dir", str(tmp_path / "one")])
    assert "cannot pick 1 of 12 speakers" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()
