"""``python -m bigpool COMMAND ...``: bigpool's command line, one module per command family.

Each command's module has ``main(argv) -> int`` taking the command name and its arguments.
"""

from __future__ import annotations

import importlib
import sys

_COMMANDS: dict[str, tuple[str, str]] = {
    "status": ("bigpool.debug.cli", "show a running cluster's machines and pool (debug endpoint)"),
    "profile": ("bigpool.debug.cli", "take a CPU profile of a running cluster (pprof or SVG)"),
    "threads": ("bigpool.debug.cli", "dump the stacks of every process of a running cluster"),
}


def _usage() -> str:
    lines = ["usage: python -m bigpool COMMAND [ARGS...]", "", "commands:"]
    lines.extend(f"  {name:<10} {help_}" for name, (_, help_) in _COMMANDS.items())
    lines.append("\n'python -m bigpool COMMAND --help' for a command's arguments.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    entry = _COMMANDS.get(args[0])
    if entry is None:
        print(f"python -m bigpool: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(entry[0])
    result: int = module.main(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
