"""``python -m bigpool <command> ...``: a small dispatcher; each command lives in its own module.

Commands are imported only when run, so ``ec2`` needs boto3 only when it is used.
"""

from __future__ import annotations

import importlib
import sys

# command -> "module:function"; the function takes the remaining arguments and returns an
# exit status.
COMMANDS = {
    "ec2": "bigpool.systems.ec2_cli:main",
    "profile": "bigpool.debug.cli:profile",
    "status": "bigpool.debug.cli:status",
    "threads": "bigpool.debug.cli:threads",
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        known = ", ".join(sorted(COMMANDS))
        print(f"usage: python -m bigpool {{{known}}} ...", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    module_name, _, function = COMMANDS[args[0]].partition(":")
    command = getattr(importlib.import_module(module_name), function)
    return int(command(args[1:]))


if __name__ == "__main__":
    sys.exit(main())
