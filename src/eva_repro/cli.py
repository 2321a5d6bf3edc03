"""`eva-repro` command line: one subcommand per pipeline stage.

Each subcommand lives in its own module, which defines `configure_parser(parser)` and
`run(args) -> int | None`; modules are imported only when their command runs, so `eva-repro
--help` stays fast and a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from eva_repro.commands import COMMANDS


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eva-repro", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the command being run pays for its imports
            importlib.import_module(module).configure_parser(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    from eva_repro.utils.errors import UserError
    from eva_repro.utils.preemption import EXIT_PREEMPTED, Preempted

    try:
        return int(module.run(args) or 0)
    except Preempted as e:  # work saved: a requeued job resumes it
        print(f"preempted: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except UserError as e:  # bad paths, shards or flags: one line; anything else is a bug (traceback)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
