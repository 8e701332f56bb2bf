"""``speakerlab embed``: embed audio files or the recordings of a wav.scp.

Writes ``<out-dir>/embedding.{ark,scp}`` (Kaldi format, readable with kaldiio). Files are keyed
by their name without extension; a wav.scp keeps its utterance ids. Recordings may have any
sample rate and any number of channels (channel 0 is used). For large 16 kHz corpora use
``speakerlab extract``, which is resumable and runs on several processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import kaldiio

from speakerlab.bin import exits_on_error
from speakerlab.data.kaldi_dir import read_wav_scp
from speakerlab.errors import ConfigError
from speakerlab.inference import DEFAULT_MODEL, SpeakerVerifier

_CHUNK = 64  # recordings read into memory at a time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="speakerlab embed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="*", help="audio files to embed")
    parser.add_argument("--wav-scp", help="embed the recordings of this 'utt path' list instead")
    parser.add_argument("--out-dir", required=True, help="where embedding.{ark,scp} go")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="registry id, checkpoint file or .onnx file (default %(default)s)",
    )
    parser.add_argument("--normalize", action="store_true", help="write unit-length embeddings")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    return parser.parse_args(argv)


def recordings(args: argparse.Namespace) -> dict[str, str]:
    """Key -> path of everything to embed."""
    if bool(args.files) == bool(args.wav_scp):
        raise ConfigError("give either audio files or --wav-scp")
    if args.wav_scp:
        return read_wav_scp(args.wav_scp)
    table: dict[str, str] = {}
    for path in args.files:
        key = Path(path).stem
        if key in table:
            raise ConfigError(
                f"{table[key]} and {path} would both be called {key!r}; "
                "give them ids with a wav.scp"
            )
        table[key] = path
    return table


def run(args: argparse.Namespace) -> None:
    table = recordings(args)
    verifier = SpeakerVerifier.load(args.model, device=args.device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ark, scp = (out_dir / "embedding.ark").resolve(), out_dir / "embedding.scp"
    keys = list(table)
    with kaldiio.WriteHelper(f"ark,scp:{ark},{scp}") as writer:
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            matrix = verifier.embed_many([table[k] for k in chunk], normalize=args.normalize)
            for key, vector in zip(chunk, matrix):
                writer(key, vector)
    print(f"wrote {len(keys)} embeddings of dimension {matrix.shape[1]} to {scp}")


@exits_on_error("embed")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
