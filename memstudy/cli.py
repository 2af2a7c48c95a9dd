"""The ``memstudy`` command.

Each area of the package registers its own subcommands; this module only assembles them.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for ``memstudy`` and all of its subcommands."""
    from memstudy.book import add_book_command
    from memstudy.correlate.command import add_bench_correlate_command, add_correlate_command
    from memstudy.data.command import add_data_command
    from memstudy.models.command import add_bench_train_command, add_model_commands
    from memstudy.study import add_study_command

    parser = argparse.ArgumentParser(
        prog="memstudy",
        description="Do generative models copy their training images? Prepare data, train models, "
        "correlate synthetic with training images, and build the book.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
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


def main(argv: list[str] | None = None) -> int:
    """Run the ``memstudy`` command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"memstudy {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
