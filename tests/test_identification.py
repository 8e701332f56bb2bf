"""Speaker identification: the database (enroll, update, remove, search, file round trip and
checks), the model identity, and the enroll/identify/db commands."""

import json
import subprocess

import numpy as np
import pytest
import soundfile
import torch

from speakerlab.bin import db as db_cli
from speakerlab.bin import enroll as enroll_cli
from speakerlab.bin import identify as identify_cli
from speakerlab.errors import ConfigError, DataError
from speakerlab.identification import SpeakerDB, check_name, model_identity, updating
from speakerlab.models import build_model
from speakerlab.models.checkpoint import save_embedding_model

DIM = 8


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def make_db(num_speakers=20, seed=0):
    rng = np.random.default_rng(seed)
    db = SpeakerDB.create("weights:abc", DIM, "model.ckpt")
    centres = rng.standard_normal((num_speakers, DIM))
    for i, centre in enumerate(centres):
        db.enroll(f"spk{i}", centre + 0.1 * rng.standard_normal((3, DIM)))
    return db, centres


def test_enroll_keeps_the_exact_mean_of_all_recordings():
    db = SpeakerDB.create("weights:abc", 3)
    first, second = np.array([[3.0, 0, 0], [0, 2.0, 0]]), np.array([[0, 0, 5.0]])
    db.enroll("alice", first)
    db.enroll("alice", second)
    expected = (np.array([1, 0, 0]) + np.array([0, 1, 0]) + np.array([0, 0, 1])) / 3
    np.testing.assert_allclose(db.means[0], expected, atol=1e-7)
    assert db.counts.tolist() == [3] and len(db) == 1
    db.enroll("alice", second, replace=True)
    np.testing.assert_allclose(db.means[0], [0, 0, 1], atol=1e-7)
    assert db.counts.tolist() == [1]
    with pytest.raises(ConfigError, match="3 dimensions, the database 3|2 dimensions"):
        db.enroll("bob", np.ones((1, 2)))
    with pytest.raises(DataError, match="zero or not finite"):
        db.enroll("bob", np.zeros((1, 3)))
    assert "bob" not in db


def test_identify_ranks_speakers_by_cosine():
    db, centres = make_db()
    query = centres[7] + 0.05 * np.random.default_rng(9).standard_normal(DIM)
    (result,) = db.identify(query, top_k=4, threshold=0.5)
    # Expected ranking computed directly from the stored means.
    cosines = [unit(m) @ unit(query) for m in db.means]
    expected = sorted(range(len(cosines)), key=lambda i: -cosines[i])[:4]
    assert [m.speaker for m in result.matches] == [f"spk{i}" for i in expected]
    assert [m.score for m in result.matches] == pytest.approx([cosines[i] for i in expected])
    assert result.speaker == "spk7"
    # Below the threshold the answer is "unknown", the candidates are still listed.
    (below,) = db.identify(query, top_k=2, threshold=0.9999)
    assert below.matches[0].score < 0.9999
    assert below.speaker is None and below.matches[0].speaker == "spk7"
    # Several queries at once; top_k beyond the database lists everyone.
    results = db.identify(np.stack([centres[1], centres[2]]), top_k=100)
    assert [r.matches[0].speaker for r in results] == ["spk1", "spk2"]
    assert len(results[0].matches) == 20


def test_remove_and_round_trip(tmp_path):
    db, centres = make_db(50)
    db.remove(["spk3", "spk10"])
    assert len(db) == 48 and "spk3" not in db and "spk4" in db
    with pytest.raises(DataError, match="not in the speaker database: 'nobody'"):
        db.remove(["spk4", "nobody"])
    assert "spk4" in db  # nothing removed
    path = db.save(tmp_path / "speakers.db")
    loaded = SpeakerDB.load(path)
    assert loaded.names == db.names and loaded.model == "weights:abc"
    assert loaded.model_source == "model.ckpt"
    np.testing.assert_array_equal(loaded.means, db.means)
    np.testing.assert_array_equal(loaded.counts, db.counts)
    assert loaded.identify(centres[4])[0].matches[0].speaker == "spk4"
    # The archive holds plain arrays only: it loads without pickle.
    with np.load(path, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["counts", "directions", "header", "lengths"]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: p.write_bytes(b"not a zip"), "not a readable speaker database"),
        (
            lambda p: np.savez(open(p, "wb"), header=np.array([object()], dtype=object)),
            "not a readable speaker database",
        ),
        (
            lambda p: np.savez(
                open(p, "wb"),
                header=np.frombuffer(json.dumps({"format": "other"}).encode(), np.uint8),
            ),
            "not a speaker database of speakerlab",
        ),
        (
            lambda p: np.savez(
                open(p, "wb"),
                header=np.frombuffer(
                    json.dumps(
                        {
                            "format": "speakerlab-speaker-db",
                            "version": 1,
                            "names": ["a", "b"],
                            "dim": 2,
                            "model": "m",
                        }
                    ).encode(),
                    np.uint8,
                ),
                directions=np.ones((1, 2), np.float32),
                lengths=np.ones(1, np.float32),
                counts=np.ones(1, np.int64),
            ),
            "inconsistent",
        ),
    ],
)
def test_bad_database_files_are_clear_errors(tmp_path, corrupt, message):
    path = tmp_path / "speakers.db"
    corrupt(path)
    with pytest.raises(DataError, match=message):
        SpeakerDB.load(path)


def test_another_model_is_refused(tmp_path):
    db, _ = make_db(3)
    db.save(tmp_path / "speakers.db")
    with pytest.raises(ConfigError, match="another model"):
        with updating(tmp_path / "speakers.db", "weights:other", DIM):
            pass
    with updating(tmp_path / "speakers.db", "weights:abc", DIM) as same:
        same.enroll("new", np.ones((1, DIM)))
    assert "new" in SpeakerDB.load(tmp_path / "speakers.db")


@pytest.mark.parametrize("name", ["", " alice", "bob\n", "tab\tname"])
def test_bad_speaker_names(name):
    with pytest.raises(ConfigError, match="speaker name"):
        check_name(name)


def test_model_identity_follows_the_weights_not_the_file(tmp_path):
    torch.manual_seed(0)
    model = build_model("campplus", embedding_size=16, growth_rate=8, bn_size=2, init_channels=8)
    save_embedding_model(model, tmp_path / "plain.ckpt")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(
        {"model": state, "model_name": "campplus", "model_kwargs": {}, "epoch": 3},
        tmp_path / "training.ckpt",
    )
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.ckpt")
    identity = model_identity(tmp_path / "plain.ckpt")
    assert identity.startswith("weights:")
    assert model_identity(tmp_path / "training.ckpt") == identity
    assert model_identity(tmp_path / "ddp.ckpt") == identity
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    save_embedding_model(model, tmp_path / "changed.ckpt")
    assert model_identity(tmp_path / "changed.ckpt") != identity


# --------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(
            "campplus", embedding_size=32, growth_rate=8, bn_size=2, init_channels=16
        )
        paths.append(directory / f"model{seed}.ckpt")
        save_embedding_model(model.eval(), paths[-1])
    return paths


def voice(path, freq, seed):
    t = np.arange(24000) / 16000
    rng = np.random.default_rng(seed)
    wav = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    soundfile.write(path, (wav + 0.01 * rng.standard_normal(t.size)).astype(np.float32), 16000)
    return str(path)


@pytest.mark.slow  # loads the model in five commands (each probes its shortest input)
def test_enroll_identify_list_remove(model_files, tmp_path, capsys):
    db = str(tmp_path / "speakers.db")
    model = str(model_files[0])
    low = [voice(tmp_path / f"low{i}.wav", 120, i) for i in range(3)]
    high = [voice(tmp_path / f"high{i}.wav", 900, 10 + i) for i in range(3)]
    enroll_cli.main(["--db", db, "--speaker", "low", "--model", model, *low[:2]])
    enroll_cli.main(["--db", db, "--speaker", "high", *high[:2]])  # the database's model
    out = capsys.readouterr().out
    assert "enrolled low: 2 recording(s)" in out and "holds 2 speaker(s)" in out

    identify_cli.main(["--db", db, "--threshold", "-1", low[2], high[2]])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{low[2]}: low (score ")
    assert lines[3].startswith(f"{high[2]}: high (score ")
    identify_cli.main(["--db", db, "--threshold", "1.01", low[2]])
    assert "unknown (best low" in capsys.readouterr().out

    db_cli.main(["list", "--db", db])
    listing = capsys.readouterr().out.splitlines()
    assert "2 speaker(s), 32-dimensional" in listing[0] and listing[1:] == ["high\t2", "low\t2"]
    db_cli.main(["remove", "--db", db, "high"])
    assert SpeakerDB.load(db).names == ["low"]

    with pytest.raises(SystemExit):
        enroll_cli.main(["--db", db, "--speaker", "x", "--model", str(model_files[1]), low[0]])
    assert "another model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        identify_cli.main(["--db", db, low[0]])  # our checkpoint: no known threshold
    assert "pass --threshold" in capsys.readouterr().err


def test_commands_are_listed():
    result = subprocess.run(
        ["python", "-m", "speakerlab", "--help"], capture_output=True, text=True, check=True
    )
    for name in ("calibrate", "make-trials", "enroll", "identify", "db"):
        assert f"\n  {name} " in result.stdout
