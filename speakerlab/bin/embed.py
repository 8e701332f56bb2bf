"""``speakerlab embed``: embed audio files or the recordings of a wav.scp.

Writes ``<out-dir>/embedding.scp`` (Kaldi format, readable with kaldiio) and the ark it refers to.
Files are keyed by their name without extension, each run of whitespace in it replaced by ``_``
(keys hold no whitespace); a wav.scp keeps its utterance ids. Recordings may have any sample rate
and any number of channels (channel 0 is used); recordings longer than --window-seconds are
embedded in windows whose embeddings are averaged. Every input is checked before anything is
written, and the folder's earlier results are replaced only when all recordings are embedded.
For large 16 kHz corpora use ``speakerlab extract``, which is resumable and runs on several
processes.
"""

from __future__ import annotations

import argparse

from speakerlab.bin import add_embedding_options, exits_on_error
from speakerlab.data.kaldi_dir import read_wav_scp
from speakerlab.errors import ConfigError
from speakerlab.extract import embed_recordings, keys_for_files
from speakerlab.inference import DEFAULT_MODEL, SpeakerVerifier


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="speakerlab embed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="*", help="audio files to embed")
    parser.add_argument("--wav-scp", help="embed the recordings of this 'utt path' list instead")
    parser.add_argument("--out-dir", required=True, help="where embedding.scp and its ark go")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="registry id, checkpoint file or .onnx file (default %(default)s)",
    )
    parser.add_argument("--normalize", action="store_true", help="write unit-length embeddings")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    add_embedding_options(parser)
    return parser.parse_args(argv)


def recordings(args: argparse.Namespace) -> dict[str, str]:
    """Key -> path of everything to embed."""
    if bool(args.files) == bool(args.wav_scp):
        raise ConfigError("give either audio files or --wav-scp")
    if args.wav_scp:
        table = read_wav_scp(args.wav_scp)
        if not table:
            raise ConfigError(f"{args.wav_scp}: no recordings listed")
        return table
    return keys_for_files(args.files)


def run(args: argparse.Namespace) -> None:
    table = recordings(args)
    verifier = SpeakerVerifier.load(
        args.model,
        device=args.device,
        window_seconds=args.window_seconds,
        max_batch_frames=args.max_batch_frames,
        precision=args.precision,
    )
    scp, dim = embed_recordings(verifier, table, args.out_dir, normalize=args.normalize)
    print(f"wrote {len(table)} embeddings of dimension {dim} to {scp}")


@exits_on_error("embed")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
