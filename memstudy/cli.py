"""The ``memstudy`` command.

Each area of the package registers its own subcommands; this module only assembles them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

#: Errors that report a mistake in what the user gave (a path, an option value, a file's content):
#: printed as one line with exit status 2. Anything else (TypeError, AttributeError, KeyError...) is a
#: bug and keeps its traceback.
USER_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ValueError,
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage of a command with many options buries the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for ``memstudy`` and all of its subcommands."""
    from memstudy.book import add_book_command
    from memstudy.correlate.command import add_bench_correlate_command, add_correlate_command
    from memstudy.data.command import add_data_command
    from memstudy.models.command import add_bench_train_command, add_model_commands
    from memstudy.workflow.command import add_study_command

    parser = _Parser(
        prog="memstudy",
        description="Do generative models copy their training images? Prepare data, train models, "
        "correlate synthetic with training images, and build the book.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log debug messages (and other libraries' info messages); show the traceback of an error",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_data_command(commands)
    add_model_commands(commands)
    add_correlate_command(commands)
    add_study_command(commands)
    add_book_command(commands)
    bench = commands.add_parser(
        "bench",
        help="measure speed on this machine (ratios measured in one run)",
        description="Benchmarks that print ratios measured in one run on this machine.",
    )
    benches = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    add_bench_correlate_command(benches)
    add_bench_train_command(benches)
    return parser


def configure_logging(verbose: bool = False) -> None:
    """Log memstudy's messages from INFO (DEBUG if ``verbose``), other libraries' from WARNING (INFO).

    Dask, papermill, matplotlib and the like log progress at INFO; without ``-v`` it would bury ours.
    """
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("memstudy").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run the ``memstudy`` command; return its exit status.

    A user error (see ``USER_ERRORS``) prints one line ``memstudy COMMAND: error: ...`` and returns
    2, as argparse does for a bad option; with ``-v`` it shows the traceback instead.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.func(args) or 0
    except USER_ERRORS as error:
        if args.verbose:
            raise
        print(f"memstudy {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memstudy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
