"""The `hip` command: one small function per subcommand.

User errors (bad flags, bad config, failed pre-flight checks) print one line
`hip: error: ...` to stderr and return 2, without a traceback. Heavy imports (Ray, media
decoders) happen inside the subcommand that needs them, so `hip --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hip_pipeline import quickstart as cli_quickstart
from hip_pipeline import sweep as cli_sweep
from hip_pipeline import train as cli_train
from hip_pipeline.errors import UsageError
from pipeline.constants import MODALITIES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage + exit(2); we want one line
        command = self.prog.removeprefix("hip").strip()
        raise UsageError(f"{command}: {message}" if command else message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hip", description="Hierarchical Perceiver pipeline on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("preprocess", help="raw image/audio/video files -> Parquet shards",
                       description="Decode raw media with Ray Data into train/val/rejects "
                       "Parquet shards plus manifest.json. key=value pairs override the config.")
    p.add_argument("--modality", choices=MODALITIES)
    p.add_argument("--input", metavar="PATH_OR_URI", help="folder or gs:// prefix of raw files")
    p.add_argument("--output", metavar="PATH_OR_URI", help="folder or gs:// prefix for shards")
    p.add_argument("--config", metavar="YAML", help="preprocess config (defaults if omitted)")
    p.add_argument("--labels", metavar="CSV", help="CSV path,label (else class sub-folders)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. image.size=128")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("sample-data", help="write the small labelled sample dataset",
                       description="Write DIR/image/<class>/*.png, DIR/audio/<class>/*.wav, "
                       "DIR/video/<class>/*.mp4 (deterministic under --seed).")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--per-class", type=int, default=8, metavar="N")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.set_defaults(func=cmd_sample_data)

    cli_train.add_parsers(sub)
    cli_sweep.add_parsers(sub)
    cli_quickstart.add_parser(sub)
    return parser


def cmd_preprocess(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.data.config import PreprocessConfig
    from pipeline.data.preprocess import PreflightError, run_preprocess

    # Flags are typed values, not YAML: `--input yes` is the folder "yes".
    flags = {"modality": args.modality, "input": args.input, "output": args.output,
             "labels": args.labels}
    cfg = load_config(PreprocessConfig, args.config, args.overrides,
                      {k: v for k, v in flags.items() if v is not None})
    try:
        run_preprocess(cfg, overwrite=args.overwrite)
    except PreflightError as e:
        raise UsageError(str(e)) from None
    return 0


def cmd_sample_data(args: argparse.Namespace) -> int:
    from pipeline.data.sample_data import write_sample_data

    if args.per_class < 1:
        raise UsageError("--per-class must be >= 1")
    counts = write_sample_data(args.out, per_class=args.per_class, seed=args.seed)
    detail = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    print(f"wrote sample data to {args.out}: {detail}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.config import ConfigError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return args.func(args)
    except (UsageError, ConfigError) as e:
        print(f"hip: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help / --version: argparse exits; callers want a code
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("hip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
