"""Entry point of the ``convscope`` command.

Subcommands are discovered from the ``cmd_*.py`` modules in this package: each defines
``register(subparsers, parents)`` which adds its parsers and sets ``func`` (``func(args) -> int``).
Errors a user can fix print one line on stderr and exit with 2; bugs exit with 1 (``--debug`` shows
the traceback); Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import ConvscopeError
from .common import model_options


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        self.exit(2, f"convscope: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="convscope", description="A microscope for convolutional networks.")
    parser.add_argument("--version", action="version", version=f"convscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parents = [model_options()]
    here = os.path.dirname(__file__)
    modules = [importlib.import_module(f"{__package__}.{m.name}") for m in pkgutil.iter_modules([here]) if m.name.startswith("cmd_")]
    for module in sorted(modules, key=lambda m: getattr(m, "ORDER", 100)):
        module.register(sub, parents)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except ConvscopeError as exc:
        if debug:
            raise
        print(f"convscope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convscope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug: say so in one line, full traceback with --debug
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"convscope: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
