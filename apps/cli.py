"""The ``flashtier`` command line.

Subcommands live in :mod:`flashtier.apps.commands`, one module each, and are discovered
automatically: a module that defines ``register(subparsers)`` adds its parser and sets
``func(args) -> int``. Errors the user can act on (:class:`~flashtier.errors.FlashtierError`)
print one line on stderr and exit 1; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Sequence

from flashtier import __version__
from flashtier.errors import FlashtierError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one ``--help`` away) and no abbreviated flags:
    a mistyped option (``--expert-slot``) is an error, not silently another one."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    import flashtier.apps.commands as commands

    parser = _Parser(prog="flashtier", description="Run language models bigger than your memory.")
    parser.add_argument("--version", action="version", version=f"flashtier {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except FlashtierError as e:
        print(f"flashtier {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"flashtier {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
