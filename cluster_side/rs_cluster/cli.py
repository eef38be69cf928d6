"""The ``rs-cluster`` command line: parses arguments and dispatches to the stages.

Nothing heavy is imported here (no pyspark, tensorflow or horovod), so ``--help`` is instant; each
stage imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from typing import Any, Callable, Sequence

from rs_cluster import __version__
from rs_cluster.errors import DiskFullError, RsClusterError, disk_full_error, is_disk_full
from rs_cluster.progress import JsonLinesReporter, Reporter, TeeReporter, TerminalReporter

# Modules that add their own sub-commands with ``register(subparsers)``; each keeps its imports
# light for the same reason as this one.
_COMMAND_MODULES = ("rs_cluster.prepare_cli", "rs_cluster.train_cli", "rs_cluster.predict_cli",
                    "rs_cluster.jobs_cli")
# What job runners and their steps run with ``python -m``.
ENTRY_MODULE = "rs_cluster"


def build_parser(extra_commands: Sequence[Callable[[Any], None]] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rs-cluster",
        description="Building masks from aerial imagery on a Spark cluster: prepare tiles, train a "
        "U-Net with Horovod, predict georeferenced masks, evaluate them, run jobs.",
    )
    parser.add_argument("--version", action="version", version=f"rs-cluster {__version__}")
    parser.add_argument("--events", metavar="FILE",
                        help="also write JSON-lines progress events to FILE ('-' for stdout)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for register in extra_commands:
        register(sub)
    return parser


def make_reporter(events: str | None, quiet: bool) -> tuple[Reporter, Callable[[], None]]:
    reporters: list[Reporter] = []
    closers: list[Callable[[], None]] = []
    if not quiet:
        reporters.append(TerminalReporter())
    if events == "-":
        reporters.append(JsonLinesReporter(sys.stdout))
    elif events:
        stream = open(events, "a", encoding="utf-8")  # noqa: SIM115 - closed by the closer
        reporters.append(JsonLinesReporter(stream))
        closers.append(stream.close)
    reporter: Reporter = reporters[0] if len(reporters) == 1 else TeeReporter(reporters)

    def close() -> None:
        reporter.close()
        for c in closers:
            # Each event was flushed as written; a close that still fails found the disk full
            # and must not hide the error that the stage is reporting.
            with contextlib.suppress(OSError):
                c()

    return reporter, close


def main(argv: Sequence[str] | None = None, *, entry_module: str = ENTRY_MODULE,
         extra_commands: Sequence[Callable[[Any], None]] = ()) -> int:
    """Runs one command. A wrapper that adds ``extra_commands`` (the tests' self-test stage, see
    tests/cluster_selftest.py) passes its own module as ``entry_module``: the job runners it starts,
    and their steps, then run that wrapper too. The commands are fixed in code on purpose: no
    environment variable or job spec can add one to the ``rs-cluster`` users run."""
    # TensorFlow's start-up INFO lines (oneDNN, CPU features) say nothing a user can act on.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    parser = build_parser(extra_commands)
    parser.set_defaults(entry_module=entry_module)
    args = parser.parse_args(argv)
    reporter, close = make_reporter(args.events, args.quiet)
    error = ""
    try:
        code = int(args.func(args, reporter) or 0)
    except RsClusterError as e:
        error, code = f"error: {e}", e.exit_code
    except Exception as e:
        # A full disk can surface from any library (GDAL, Arrow, the JVM): say so on one line.
        if not is_disk_full(e):
            raise
        error, code = f"error: {disk_full_error(e)}", DiskFullError.exit_code
    except KeyboardInterrupt:
        error, code = "interrupted; nothing was left half-written", 130
    finally:
        close()
    if error:
        print(f"rs-cluster {args.command}: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
