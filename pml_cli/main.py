"""`pml`: the language commands (validate, layout) and the engine commands (encode, store, run, bench, ...).

This module sits above every package and imports torch only inside engine handlers, so that
`pml validate` without `--model` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from prompt_cache.threads import set_wait_policy  # torch-free

# How idle OpenMP threads wait (prompt_cache.threads.wait_policy): read when torch loads its
# OpenMP runtime, so set before anything imports torch. `pml serve` runs for long: passive.
set_wait_policy(long_running=sys.argv[1:2] == ["serve"])

from pml import cli as language_cli
from pml.layout import Tokenizer
from pml_cli import engine_commands, serve_commands
from prompt_cache import DEFAULT_MODEL


def load_tokenizer(name: str | None) -> Tokenizer:
    """The tokenizer of model `name` (None: the default model), without loading its weights."""
    from prompt_cache.models import load_tokenizer as load

    return load(name or DEFAULT_MODEL)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pml", description="Prompt Markup Language tools (Prompt Cache).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    language_cli.add_commands(sub)
    engine_commands.add_commands(sub)
    serve_commands.add_commands(sub)
    for p in (parser, *sub.choices.values()):  # every command's bad arguments: one line, exit 2
        engine_commands.one_line_errors(p)
    return parser


def main(argv: Sequence[str] | None = None, *, tokenizer_loader=None) -> int:
    """Run `pml`; returns the exit code (0 ok, 2 bad input). `tokenizer_loader` is for tests."""
    return language_cli.main(argv, tokenizer_loader=tokenizer_loader or load_tokenizer, parser=build_parser(),
                            default_model=DEFAULT_MODEL)


if __name__ == "__main__":
    sys.exit(main())
