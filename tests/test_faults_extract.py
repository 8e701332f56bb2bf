"""Fault injection for extract, embed, verify and export-onnx (issue 10): each case names the
failure it guards against and checks the correct behaviour. Fast cases use a stand-in embedder
(fbank statistics); the commands run with a small CAM++ checkpoint."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import kaldiio
import numpy as np
import pytest
import soundfile
import torch
from processes import run_bounded

from speakerlab import embedding_store
from speakerlab.bin import embed as embed_cli
from speakerlab.bin import export_onnx as export_cli
from speakerlab.bin import extract as extract_cli
from speakerlab.bin import verify as verify_cli
from speakerlab.embedder import Embedder, TorchEmbedder
from speakerlab.embedding_store import read_embeddings
from speakerlab.errors import AudioError, DataError
from speakerlab.extract import extract_embeddings
from speakerlab.fileio import LockedError, exclusive_lock, file_digest
from speakerlab.inference import SpeakerVerifier
from speakerlab.models import build_model
from speakerlab.models.checkpoint import save_embedding_model

RATE = 16000
SMALL_CAMPPLUS = dict(embedding_size=32, growth_rate=8, bn_size=2, init_channels=16)


class StatsEmbedder(Embedder):
    """A fast stand-in model: per-bin mean and standard deviation of the fbank, projected.
    ``poison_frames``: inputs of that many frames give NaN (a model that fails on some input)."""

    def __init__(self, seed: int = 0, poison_frames: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.projection = rng.standard_normal((160, 16)).astype(np.float32)
        self.seed, self.poison_frames = seed, poison_frames
        self.calls = 0

    def embed_features(self, feats):
        self.calls += feats.shape[0]
        x = feats.numpy().astype(np.float64)
        stats = np.concatenate([x.mean(axis=1), x.std(axis=1, ddof=1)], axis=1)
        out = (stats @ self.projection).astype(np.float32)
        if feats.shape[1] == self.poison_frames:
            out[:] = np.nan
        return out

    @property
    def identity(self) -> str:
        return f"stats:{self.seed}"

    @property
    def min_frames(self) -> int:
        return 2  # a standard deviation needs two frames (no probing: calls counts real work)


def write_wav(path: Path, seconds: float, seed: int, subtype: str = "PCM_16") -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    wav = 0.3 * np.sin(2 * np.pi * (150 + 20 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wav.astype(np.float32), RATE, subtype=subtype)
    return path


def write_list(path: Path, table: dict[str, Path]) -> Path:
    path.write_text("".join(f"{utt} {wav}\n" for utt, wav in table.items()), encoding="utf-8")
    return path


def corpus(directory: Path, count: int = 6) -> tuple[Path, dict[str, Path]]:
    table = {
        f"utt{i}": write_wav(directory / f"utt{i}.wav", 1.0 + 0.25 * (i % 3), i)
        for i in range(count)
    }
    return write_list(directory / "wav.scp", table), table


def truncate_wav(path: Path) -> Path:
    """Cut the data chunk of a wav in half: the header still promises all samples."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def run(out_dir, wav_scp, embedder=None, **options):
    options.setdefault("progress", False)
    return extract_embeddings(wav_scp, embedder or StatsEmbedder(), out_dir, **options)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "campplus.pt"
    save_embedding_model(build_model("campplus", **SMALL_CAMPPLUS).eval(), path)
    return path


def cli_error(main, argv, capsys, one_line=True) -> str:
    """The error a command printed (exit status 1): one line, or a list of problems."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("speakerlab ") and "Traceback" not in err, err
    if one_line:
        assert err.count("\n") == 1, err
    return err


# --------------------------------------------------------------------------- 1. concurrency


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path):
    """Two runs writing one folder interleaved their appends and both exited 0 with scp lines
    pointing at other utterances' embeddings. Now the second run stops at once, touching
    nothing, with a message naming the holder."""
    wav_scp, _ = corpus(tmp_path / "wavs")
    out = tmp_path / "out"
    run(out, wav_scp)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with exclusive_lock(out / ".lock", what="test"):
        with pytest.raises(LockedError, match=r"output folder .*out is in use by process \d+"):
            run(out, wav_scp, StatsEmbedder(seed=1))
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == {k: v for k, v in before.items() if k != ".lock"}


def test_a_second_run_waits_for_the_first_when_asked(tmp_path):
    """--lock-wait-seconds: the second run waits for the folder instead of failing."""
    wav_scp, _ = corpus(tmp_path / "wavs")
    out = tmp_path / "out"
    released = threading.Event()

    def hold():
        with exclusive_lock(out / ".lock", what="test"):
            time.sleep(1.5)
        released.set()

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.3)
    run(out, wav_scp, lock_wait_seconds=30)
    holder.join()
    assert released.is_set()
    assert len(read_embeddings(out / "embedding.scp")) == 6


def test_embed_into_a_busy_folder_is_refused(tmp_path, checkpoint, capsys):
    """embed writes the same kind of folder: it takes the same lock."""
    wav = write_wav(tmp_path / "a.wav", 1.0, 0)
    out = tmp_path / "out"
    with exclusive_lock(out / ".lock", what="test"):
        err = cli_error(
            embed_cli.main, [str(wav), "--model", str(checkpoint), "--out-dir", str(out)], capsys
        )
    assert "is in use by" in err and not (out / "embedding.scp").exists()


@pytest.mark.slow
def test_two_extract_processes_never_mix_outputs(tmp_path, checkpoint):
    """Two `speakerlab extract` processes started together into one folder: one is refused (or
    finds the work done), never do both write; the result equals a run alone."""
    wav_scp, _ = corpus(tmp_path / "wavs", count=24)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "speakerlab", "extract", "--model", str(checkpoint),
        "--wav-scp", str(wav_scp), "--out-dir", str(out), "--backend", "torch",
        "--device", "cpu", "--num-workers", "0", "--no-progress", "--batch-size", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in processes]
    for p in processes:
        p.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 1]), results
    for code, err in results:
        if code:
            assert "is in use by" in err
    alone = SpeakerVerifier(TorchEmbedder(build_model("campplus", **SMALL_CAMPPLUS)))
    alone.embedder.model.load_state_dict(torch.load(checkpoint, weights_only=True))
    got = read_embeddings(out / "embedding.scp")
    assert list(got) == [f"utt{i}" for i in range(24)]
    for i, (key, vector) in enumerate(got.items()):
        expected = alone.embed(tmp_path / "wavs" / f"utt{i}.wav")
        np.testing.assert_allclose(vector, expected, atol=1e-4, err_msg=key)


@pytest.mark.slow
def test_a_refusal_under_torchrun_reaches_every_rank(tmp_path, checkpoint):
    """Under torchrun only rank 0 takes the lock: the other ranks learn of its refusal and all
    stop (none waits at a barrier for hours)."""
    wav_scp, _ = corpus(tmp_path / "wavs")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "speakerlab", "extract", "--model", str(checkpoint), "--wav-scp", str(wav_scp),
        "--out-dir", str(out), "--device", "cpu", "--backend", "torch", "--num-workers", "0",
    ]  # fmt: skip
    with exclusive_lock(out / ".lock", what="test"):
        result = run_bounded(command, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    # Printed once (by local rank 0), without a traceback of ours (torchrun adds its own).
    assert result.stderr.count("speakerlab extract: error: rank 0: output folder") == 1
    assert "is in use by" in result.stderr
    assert "speakerlab/" not in result.stderr.split("Traceback")[-1].split("ChildFailedError")[0]
    assert not (out / "embedding.scp").exists()


def test_offsets_are_checked_against_their_keys(tmp_path):
    """An scp line whose offset points at another utterance's entry was read without a word.
    Reading now checks that each offset follows its own key."""
    wav_scp, _ = corpus(tmp_path / "wavs", count=3)
    scp = run(tmp_path / "out", wav_scp)
    lines = scp.read_text(encoding="utf-8").splitlines()
    offset = lines[1].rsplit(":", 1)[1]
    lines[0] = lines[0].rsplit(":", 1)[0] + ":" + offset  # utt0 pointing at utt1's vector
    scp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="the entry at offset .* does not belong to 'utt0'"):
        read_embeddings(scp)


@pytest.mark.parametrize("where", ["before the scp is replaced", "before old files go"])
def test_a_kill_during_the_merge_never_leaves_a_wrong_scp(tmp_path, monkeypatch, where):
    """The merged ark used to be renamed before the scp: a kill in between left the old scp
    with the new ark, every offset wrong. Now the scp is the one commit point: after a kill it is
    absent or right, and the next run completes the work without embedding anything again."""
    wav_scp, table = corpus(tmp_path / "wavs")
    out = tmp_path / "out"
    first = read_embeddings(run(out, wav_scp))
    table["late"] = write_wav(tmp_path / "wavs" / "late.wav", 1.1, 40)
    write_list(wav_scp, table)
    reference = read_embeddings(run(tmp_path / "reference", wav_scp))

    target = "write_text_atomic" if where == "before the scp is replaced" else "remove_other_sets"
    real = getattr(embedding_store, target)

    def killed(path, *args, **kwargs):
        if target == "remove_other_sets" or Path(path).name == "embedding.scp":
            raise KeyboardInterrupt("killed")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(embedding_store, target, killed)
    with pytest.raises(KeyboardInterrupt):
        run(out, wav_scp)
    monkeypatch.undo()
    scp = out / "embedding.scp"
    if scp.exists():  # committed: it must be the new, complete result
        got = read_embeddings(scp)
        assert list(got) == list(reference)
    else:
        assert where == "before the scp is replaced"
    again = StatsEmbedder()
    got = read_embeddings(run(out, wav_scp, again))
    assert again.calls == 0  # everything was kept
    assert list(got) == list(reference)
    for key in reference:
        np.testing.assert_allclose(got[key], reference[key], atol=1e-6)
    for key in first:
        np.testing.assert_allclose(got[key], first[key], atol=1e-6)
    # One set is left: the committed one.
    assert len(list(out.glob("embedding.*.ark"))) == len(list(out.glob("embedding.*.jsonl"))) == 1
    assert not (out / "parts").exists()


def test_a_torn_part_is_cut_back_to_its_last_complete_entry(tmp_path):
    """Bytes appended to a part after its last recorded entry (a killed writer, or another
    writer), or a damaged record line, must never shift the offsets of what comes next."""
    wav_scp, _ = corpus(tmp_path / "wavs")
    out = tmp_path / "out"

    class Interrupted(StatsEmbedder):
        def embed_features(self, feats):
            if self.calls >= 2:
                raise KeyboardInterrupt("killed")
            return super().embed_features(feats)

    with pytest.raises(KeyboardInterrupt):
        run(out, wav_scp, Interrupted(), batch_size=1)
    part = next((out / "parts").glob("*.ark"))
    with open(part, "ab") as handle:
        handle.write(b"utt9 \0BFV\4\x10\0\0\0garbage from another writer")
    with open(part.with_suffix(".jsonl"), "ab") as handle:  # and a damaged record line
        handle.write(b'{"utt": "utt5", "start": 1\xff\n')
    got = read_embeddings(run(out, wav_scp, batch_size=1))
    reference = read_embeddings(run(tmp_path / "ref", wav_scp, batch_size=1))
    for key in reference:
        np.testing.assert_allclose(got[key], reference[key], atol=1e-6)


# --------------------------------------------------------------------------- 2. stale outputs


def test_a_changed_model_is_never_taken_for_the_old_one(tmp_path, caplog):
    """Resume used to decide from the model's path: a retrained model at the same path kept
    the old embeddings. It now decides from the model's identity (its weights)."""
    wav_scp, _ = corpus(tmp_path / "wavs")
    out = tmp_path / "out"
    old = read_embeddings(run(out, wav_scp, StatsEmbedder(seed=0)))
    retrained = StatsEmbedder(seed=1)
    with caplog.at_level(logging.INFO, logger="speakerlab.extract"):
        new = read_embeddings(run(out, wav_scp, retrained))
    assert "model changed: discarding 6 embeddings" in caplog.text
    assert retrained.calls == 6
    fresh = read_embeddings(run(tmp_path / "fresh", wav_scp, StatsEmbedder(seed=1)))
    for key in old:
        assert not np.allclose(new[key], old[key])
        np.testing.assert_allclose(new[key], fresh[key], atol=1e-6)


def test_changed_audio_and_paths_are_embedded_again(tmp_path, caplog):
    """A key pointed at another file, or a file rewritten in place (even with its size and
    modification time put back), kept its old embedding. Content digests catch both; only the
    changed entries are embedded again, with one log line."""
    wav_scp, table = corpus(tmp_path / "wavs")
    out = tmp_path / "out"
    run(out, wav_scp)
    # utt1 rewritten in place with other audio of the same length and the same mtime.
    stat = table["utt1"].stat()
    write_wav(table["utt1"], 1.25, seed=77)
    os.utime(table["utt1"], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert table["utt1"].stat().st_size == stat.st_size
    # utt2 pointed at another file; utt3 at a copy of its own file elsewhere (same content).
    table["utt2"] = write_wav(tmp_path / "other" / "x.wav", 1.5, seed=78)
    table["utt3"] = Path(shutil.copy(table["utt3"], tmp_path / "other" / "copy.wav"))
    write_list(wav_scp, table)
    counting = StatsEmbedder()
    with caplog.at_level(logging.INFO, logger="speakerlab.extract"):
        got = read_embeddings(run(out, wav_scp, counting))
    assert "3 entries changed path/content/windows: re-embedding them" in caplog.text
    assert counting.calls == 3
    fresh = read_embeddings(run(tmp_path / "fresh", wav_scp))
    for key in fresh:
        np.testing.assert_allclose(got[key], fresh[key], atol=1e-6)


def test_another_window_length_re_embeds_exactly_the_recordings_it_cuts(tmp_path, caplog):
    """A window length changes the embeddings of the recordings it cuts, and only theirs."""
    wav_scp, _ = corpus(tmp_path / "wavs")  # 1.0, 1.25, 1.5, 1.0, 1.25, 1.5 s
    out = tmp_path / "out"
    run(out, wav_scp)
    counting = StatsEmbedder()
    with caplog.at_level(logging.INFO, logger="speakerlab.extract"):
        got = read_embeddings(run(out, wav_scp, counting, window_seconds=1.2))
    # 1.2 s is 118 frames: the 1.25 s (123 frames) and 1.5 s (148) ones get 2 windows each.
    assert "4 entries changed path/content/windows: re-embedding them" in caplog.text
    assert counting.calls == 4 * 2
    fresh = read_embeddings(run(tmp_path / "fresh", wav_scp, window_seconds=1.2))
    for key in fresh:
        np.testing.assert_allclose(got[key], fresh[key], atol=1e-6)


def test_an_unchanged_rerun_embeds_nothing_and_keeps_the_files(tmp_path, caplog):
    """A rerun with the same model and audio does nothing: the ark is not rewritten."""
    wav_scp, _ = corpus(tmp_path / "wavs")
    out = tmp_path / "out"
    run(out, wav_scp)
    files = {p.name: file_digest(p) for p in out.glob("embedding.*")}
    again = StatsEmbedder()
    with caplog.at_level(logging.INFO, logger="speakerlab.extract"):
        run(out, wav_scp, again)
    assert again.calls == 0
    assert "nothing to do: all 6 utterances are done" in caplog.text
    assert {p.name: file_digest(p) for p in out.glob("embedding.*")} == files


@pytest.mark.slow
def test_stage4_rerun_reexports_only_a_changed_model(tmp_path, capsys):
    """Stage 4 exports model.ckpt and extracts with ONNX Runtime each time. A retrained model
    exported to the same path must be exported to ONNX again and embedded again; the same model
    must be neither."""
    wav_scp, table = corpus(tmp_path / "wavs")
    model_path, out = tmp_path / "model.ckpt", tmp_path / "out"
    args = ["--model", str(model_path), "--wav-scp", str(wav_scp), "--out-dir", str(out)]
    args += ["--backend", "onnx", "--device", "cpu", "--num-workers", "0", "--no-progress"]

    def model(seed):
        torch.manual_seed(seed)
        return build_model("campplus", **SMALL_CAMPPLUS).eval()

    save_embedding_model(model(0), model_path)
    extract_cli.main(args)
    first = read_embeddings(out / "embedding.scp")
    onnx_digest = file_digest(out / "model.onnx")
    ark = next(out.glob("embedding.*.ark"))

    extract_cli.main(args)  # the same model: nothing exported, nothing embedded
    assert file_digest(out / "model.onnx") == onnx_digest
    assert next(out.glob("embedding.*.ark")) == ark
    assert read_embeddings(out / "embedding.scp").keys() == first.keys()

    retrained = model(1)
    save_embedding_model(retrained, model_path)
    extract_cli.main(args)
    assert file_digest(out / "model.onnx") != onnx_digest
    second = read_embeddings(out / "embedding.scp")
    direct = SpeakerVerifier(TorchEmbedder(retrained))
    for key, path in table.items():
        assert not np.allclose(second[key], first[key], atol=1e-3)
        np.testing.assert_allclose(second[key], direct.embed(path), atol=1e-4)


@pytest.mark.slow
def test_export_onnx_skips_only_an_identical_export(tmp_path, checkpoint, capsys):
    """export-onnx keeps a file that holds the same export, and replaces one of other weights."""
    out = tmp_path / "m.onnx"
    export_cli.main(["--model", str(checkpoint), "--out", str(out), "--no-check"])
    digest = file_digest(out)
    export_cli.main(["--model", str(checkpoint), "--out", str(out), "--no-check"])
    assert "already holds this export" in capsys.readouterr().out
    assert file_digest(out) == digest
    retrained = tmp_path / "campplus.pt"
    shutil.copy(checkpoint, retrained)
    export_cli.main(["--model", str(retrained), "--out", str(out), "--no-check"])
    assert file_digest(out) != digest  # another source recorded in the metadata
    digest = file_digest(out)
    torch.manual_seed(9)
    save_embedding_model(build_model("campplus", **SMALL_CAMPPLUS).eval(), retrained)
    export_cli.main(["--model", str(retrained), "--out", str(out), "--no-check"])
    assert "exported campplus" in capsys.readouterr().out
    assert file_digest(out) != digest


# --------------------------------------------------------------------------- 4. non-finite


def test_non_finite_audio_and_embeddings_are_skipped_by_name(tmp_path):
    """Extraction stored the embedding of NaN audio with exit 0. Now audio with NaN or infinite
    samples, and embeddings that are not finite, are left out by name (listed in skipped.txt)
    and nothing non-finite is ever written."""
    wav_scp, table = corpus(tmp_path / "wavs")
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        path = write_wav(tmp_path / "wavs" / f"{name}.wav", 1.0, 50, subtype="FLOAT")
        samples, _ = soundfile.read(path, dtype="float32")
        samples[1234] = value
        soundfile.write(path, samples, RATE, subtype="FLOAT")
        table[name] = path
    table["poisoned"] = write_wav(tmp_path / "wavs" / "poisoned.wav", 1.9, 51)
    write_list(wav_scp, table)
    out = tmp_path / "out"
    embedder = StatsEmbedder(poison_frames=188)  # 1.9 s = 188 frames
    got = read_embeddings(run(out, wav_scp, embedder))
    assert sorted(got) == [f"utt{i}" for i in range(6)]
    assert all(np.isfinite(v).all() for v in got.values())
    skipped = (out / "skipped.txt").read_text(encoding="utf-8").splitlines()
    bad_audio = "audio contains 1 NaN or infinite sample(s), the first at sample 1234"
    assert skipped == [
        f"nan: {table['nan']}: {bad_audio}",
        f"inf: {table['inf']}: {bad_audio}",
        f"poisoned: {table['poisoned']}: the model gave a non-finite embedding",
    ]
    # Every vector in the folder's arks is finite, whatever the scp says.
    for ark in out.glob("embedding.*.ark"):
        assert all(np.isfinite(v).all() for _, v in kaldiio.load_ark(str(ark)))
    # Fixed files are embedded on the next run and leave the list.
    write_wav(table["nan"], 1.0, 52)
    again = read_embeddings(run(out, wav_scp, embedder))
    assert "nan" in again
    assert len((out / "skipped.txt").read_text().splitlines()) == 2


def test_verify_and_embed_reject_non_finite_audio_and_embeddings(tmp_path, checkpoint, capsys):
    """verify/embed share extraction's one check of audio and of embeddings."""
    path = write_wav(tmp_path / "nan.wav", 1.0, 0, subtype="FLOAT")
    samples, _ = soundfile.read(path, dtype="float32")
    samples[10] = np.nan
    soundfile.write(path, samples, RATE, subtype="FLOAT")
    good = write_wav(tmp_path / "good.wav", 1.0, 1)
    err = cli_error(
        verify_cli.main,
        [str(good), str(path), "--model", str(checkpoint), "--threshold", "0.5"],
        capsys,
    )
    assert "nan.wav: audio contains 1 NaN or infinite sample(s)" in err
    verifier = SpeakerVerifier(StatsEmbedder(poison_frames=98))  # 1 s = 98 frames
    with pytest.raises(AudioError, match="good.wav: the model gave a non-finite embedding"):
        verifier.embed(good)


# --------------------------------------------------------------------------- 5. embed outputs


def test_a_bad_input_leaves_earlier_embed_results_intact(tmp_path, checkpoint, capsys):
    """embed opened its outputs before checking its inputs: one bad file truncated the earlier
    results. Now all inputs are checked first, and the new set replaces the old only at the
    end: a file missing, too short, or found bad while embedding changes nothing."""
    good = [write_wav(tmp_path / f"g{i}.wav", 1.0, i) for i in range(3)]
    out = tmp_path / "out"
    args = ["--model", str(checkpoint), "--out-dir", str(out)]
    embed_cli.main([*map(str, good), *args])
    before = read_embeddings(out / "embedding.scp")
    files = sorted(p.name for p in out.iterdir())

    short = tmp_path / "short.wav"
    soundfile.write(short, np.zeros(300, np.float32), RATE)
    nan = write_wav(tmp_path / "nan.wav", 1.0, 9, subtype="FLOAT")
    samples, _ = soundfile.read(nan, dtype="float32")
    samples[5] = np.nan
    soundfile.write(nan, samples, RATE, subtype="FLOAT")
    for bad, message in (
        (tmp_path / "missing.wav", "missing.wav: file not found"),
        (short, "short.wav: 0.019 s of audio is too short"),
        (nan, "nan.wav: audio contains 1 NaN or infinite sample(s)"),
    ):
        err = cli_error(embed_cli.main, [str(good[0]), str(bad), str(good[1]), *args], capsys)
        assert message in err
        assert sorted(p.name for p in out.iterdir()) == files
        after = read_embeddings(out / "embedding.scp")
        assert list(after) == list(before)
        for key in before:
            np.testing.assert_array_equal(after[key], before[key])


def test_names_with_spaces_get_keys_without_whitespace(tmp_path, checkpoint, capsys):
    """A file name with spaces gave an scp line that could not be read back. Keys now replace
    whitespace by '_', and the folder may have any name."""
    spaced = write_wav(tmp_path / "in put" / "my  file\tname.wav", 1.0, 0)
    accented = write_wav(tmp_path / "in put" / "été ü.wav", 1.2, 1)
    out = tmp_path / "out dir ü ✓"
    embed_cli.main([str(spaced), str(accented), "--model", str(checkpoint), "--out-dir", str(out)])
    capsys.readouterr()
    got = dict(kaldiio.load_scp(str(out / "embedding.scp")))
    assert list(got) == ["my_file_name", "été_ü"]
    assert read_embeddings(out / "embedding.scp").keys() == got.keys()


# --------------------------------------------------------------------------- 7. truncated files


def test_truncated_files_are_reported_by_name(tmp_path, checkpoint, capsys):
    """A file whose header promises more samples than it holds was read short without a word.
    verify and embed stop with an error naming it; extract lists it (up front, or skipped)."""
    good = write_wav(tmp_path / "good.wav", 1.0, 0)
    cut = truncate_wav(write_wav(tmp_path / "cut.wav", 2.0, 1))
    err = cli_error(
        verify_cli.main,
        [str(good), str(cut), "--model", str(checkpoint), "--threshold", ".5"],
        capsys,
    )
    assert "cut.wav" in err and "truncated" in err
    err = cli_error(
        embed_cli.main,
        [str(good), str(cut), "--model", str(checkpoint), "--out-dir", str(tmp_path / "e")],
        capsys,
    )
    assert "cut.wav" in err and "truncated" in err
    wav_scp = write_list(tmp_path / "wav.scp", {"good": good, "cut": cut})
    out = tmp_path / "out"
    try:
        run(out, wav_scp)
    except AudioError as error:
        assert "cut.wav" in str(error) and "truncated" in str(error)
    else:
        assert "truncated" in (out / "skipped.txt").read_text()
        assert list(read_embeddings(out / "embedding.scp")) == ["good"]


# --------------------------------------------------------------------------- crashes


def test_empty_and_non_utf8_lists_are_one_line_errors(tmp_path, checkpoint, capsys):
    """`embed --wav-scp` on an empty list crashed (UnboundLocalError); a list that is not UTF-8
    crashed extract and embed (UnicodeDecodeError)."""
    empty = tmp_path / "empty.scp"
    empty.write_text("\n")
    out = ["--out-dir", str(tmp_path / "out"), "--model", str(checkpoint)]
    err = cli_error(embed_cli.main, ["--wav-scp", str(empty), *out], capsys)
    assert "empty.scp: no recordings listed" in err
    latin1 = tmp_path / "latin1.scp"
    latin1.write_bytes(b"utt1 /data/a.wav\nutt2 /data/caf\xe9.wav\n")
    err = cli_error(embed_cli.main, ["--wav-scp", str(latin1), *out], capsys)
    assert f"{latin1}:2: not UTF-8 text" in err
    err = cli_error(
        extract_cli.main,
        ["--wav-scp", str(latin1), *out, "--backend", "torch", "--device", "cpu"],
        capsys,
    )
    assert f"{latin1}:2: not UTF-8 text" in err
    err = cli_error(
        extract_cli.main,
        ["--wav-scp", str(empty), *out, "--backend", "torch", "--device", "cpu"],
        capsys,
    )
    assert "empty.scp: no utterances" in err


def test_missing_files_say_file_not_found(tmp_path, checkpoint, capsys):
    """A missing input file was reported as "System error"."""
    good = write_wav(tmp_path / "good.wav", 1.0, 0)
    gone = tmp_path / "gone.wav"
    wav_scp = write_list(tmp_path / "wav.scp", {"good": good, "gone": gone})
    err = cli_error(
        extract_cli.main,
        ["--model", str(checkpoint), "--wav-scp", str(wav_scp), "--out-dir", str(tmp_path / "o"),
         "--backend", "torch", "--device", "cpu", "--num-workers", "0"],
        capsys,
        one_line=False,  # the list of unusable recordings
    )  # fmt: skip
    assert f"gone: {gone}: file not found" in err
    err = cli_error(
        verify_cli.main,
        [str(good), str(gone), "--model", str(checkpoint), "--threshold", "0.5"],
        capsys,
    )
    assert f"{gone}: file not found" in err
    err = cli_error(
        embed_cli.main,
        [str(good), str(gone), "--model", str(checkpoint), "--out-dir", str(tmp_path / "e")],
        capsys,
    )
    assert f"{gone}: file not found" in err


def test_world_size_without_rank_is_a_one_line_error(tmp_path, checkpoint, capsys, monkeypatch):
    """`extract` under WORLD_SIZE without RANK ended in a ValueError traceback."""
    wav_scp = write_list(tmp_path / "wav.scp", {"a": write_wav(tmp_path / "a.wav", 1.0, 0)})
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = cli_error(
        extract_cli.main,
        ["--model", str(checkpoint), "--wav-scp", str(wav_scp), "--out-dir", str(tmp_path / "o")],
        capsys,
    )
    assert "incomplete distributed environment" in err and "RANK" in err


def test_output_folders_of_any_name_work_end_to_end(tmp_path, checkpoint, capsys):
    """An output folder with spaces or non-ASCII characters did all the work and then failed
    ("5 utterance(s) have no embedding"). Any characters work, through scoring."""
    wavs = tmp_path / "wavs with spaces ü"
    table = {f"s{i}": write_wav(wavs / f"rec {i} é.wav", 1.0 + 0.1 * i, i) for i in range(5)}
    wav_scp = write_list(wavs / "wav.scp", table)
    out = tmp_path / "exp dir [1] ü ✓" / "emb  ed"
    extract_cli.main(
        ["--model", str(checkpoint), "--wav-scp", str(wav_scp), "--out-dir", str(out),
         "--backend", "torch", "--device", "cpu", "--num-workers", "0", "--no-progress"]
    )  # fmt: skip
    got = read_embeddings(out / "embedding.scp")
    assert list(got) == list(table)
    assert dict(kaldiio.load_scp(str(out / "embedding.scp"))).keys() == got.keys()
    trials = tmp_path / "trials"
    trials.write_text("s0 s1 target\ns0 s2 nontarget\ns3 s4 target\ns1 s4 nontarget\n")
    from speakerlab.bin import score as score_cli

    score_cli.main(
        ["--embeddings", str(out / "embedding.scp"), "--trials", str(trials),
         "--out-dir", str(tmp_path / "scores ü"), "--no-plot"]
    )  # fmt: skip
    assert "| trials | 4 |" in capsys.readouterr().out


def test_dist_timeout_is_an_option(monkeypatch, tmp_path):
    """Ranks waited up to a hard-coded 48 h for a missing peer: the limit is now an option."""
    seen = {}

    def fake_init(device, timeout_minutes, **kwargs):
        seen["timeout"] = timeout_minutes
        raise DataError("stop here")

    monkeypatch.setattr(extract_cli, "init_distributed", fake_init)
    base = ["--model", "m", "--wav-scp", "w", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        extract_cli.main(base)
    assert seen["timeout"] == extract_cli.DIST_TIMEOUT_MINUTES == 30
    with pytest.raises(SystemExit):
        extract_cli.main([*base, "--dist-timeout-minutes", "2.5"])
    assert seen["timeout"] == 2.5


@pytest.mark.slow
def test_a_missing_peer_ends_the_run_after_the_timeout(tmp_path, checkpoint):
    """A rank whose peer never comes waited 48 h. With --dist-timeout-minutes 0.1 the lone
    rank 0 of a two-process job gives up after about 6 s."""
    wav_scp = write_list(tmp_path / "wav.scp", {"a": write_wav(tmp_path / "a.wav", 1.0, 0)})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "2"}
    env.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(probe.getsockname()[1])
    command = [
        sys.executable, "-m", "speakerlab", "extract", "--model", str(checkpoint),
        "--wav-scp", str(wav_scp), "--out-dir", str(tmp_path / "out"), "--device", "cpu",
        "--backend", "torch", "--dist-timeout-minutes", "0.1",
    ]  # fmt: skip
    start = time.monotonic()
    result = run_bounded(command, timeout=120, env=env)
    assert result.returncode != 0
    assert time.monotonic() - start < 90


# --------------------------------------------------------------------------- memory


MEMORY_PROBE = """
import re, sys, numpy as np, torch
from speakerlab.embedder import TorchEmbedder
from speakerlab.inference import SpeakerVerifier
from speakerlab.models import build_model

def peak_mb():  # this process's high-water mark (ru_maxrss would count the parent's, forked)
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s*(\\d+) kB", status.read()).group(1)) / 1024

torch.manual_seed(0)
verifier = SpeakerVerifier(
    TorchEmbedder(build_model("eres2net", m_channels=8, embedding_size=32)),
    window_seconds=float(sys.argv[2]),
    max_batch_frames=int(sys.argv[3]),
)
rng = np.random.default_rng(0)
verifier.embed(rng.standard_normal(16000 * 3).astype(np.float32))
wav = rng.standard_normal(int(16000 * float(sys.argv[1]))).astype(np.float32)
before = peak_mb()
verifier.embed(wav)
print(peak_mb() - before)
"""


@pytest.mark.slow
def test_memory_does_not_grow_with_the_length_of_a_recording():
    """verify of a 10-minute recording peaked at 7.3 GB. With windows the model's memory is that
    of max_batch_frames frames (at least one window): the peak grows with a recording's samples
    (a few MB per minute), not with its model activations. Checked with a small ERes2Net,
    2-minute input, 3 s windows one per call, against the whole-utterance run, which needs
    hundreds of MB more."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def growth(seconds, window, batch_frames):
        command = [sys.executable, "-c", MEMORY_PROBE, str(seconds), str(window), str(batch_frames)]
        result = run_bounded(command, 600, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        return float(result.stdout.strip())

    windowed = growth(120, 3.0, 298)  # one 3 s window per model call
    whole = growth(120, 1000.0, 10**6)
    # The fbank of all windows (3.8 MB) and one window's activations: well under 60 MB.
    assert windowed < 60, windowed
    assert whole > windowed + 150, (whole, windowed)
