"""`anchorcredit` command line: one module per subcommand, imported only when it runs.

Each subcommand module defines `HELP: str`, `add_arguments(parser)` and `run(args) -> int`,
and imports torch (and anything heavy) only inside run(): `anchorcredit --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from anchorcredit import __version__

SUBCOMMANDS = {
    "serve": "anchorcredit.cli.serve",
    "score": "anchorcredit.cli.score",
    "show": "anchorcredit.cli.show",
    "analyze": "anchorcredit.cli.analyze",
    "experiment": "anchorcredit.cli.experiment",
}


def build_parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's."""
    parser = argparse.ArgumentParser(
        prog="anchorcredit",
        description="Per-token credit (WAAD, FAI, gamma_t) from a policy model's attention.",
    )
    parser.add_argument("--version", action="version", version=f"anchorcredit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers = {}
    for name, module_name in SUBCOMMANDS.items():
        # Subcommand modules keep torch imports inside run(), so importing all is cheap.
        module = importlib.import_module(module_name)
        subparsers[name] = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(subparsers[name])
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, subparsers = _parsers()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a subcommand's wrong flag: that subcommand's usage, not the top level's
        subparsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    module = importlib.import_module(SUBCOMMANDS[args.command])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
