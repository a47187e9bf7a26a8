"""The language commands of ``pml``: ``validate``, ``layout``, ``import-authors`` (pure: tokenizers come from a loader).

The ``pml`` console command (``pml_cli``) registers these beside the engine commands and passes a
tokenizer loader; ``python -m pml.cli`` runs them alone, needing a loader only for ``--model``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from pml import compat
from pml.errors import PMLError
from pml.layout import Layout, Tokenizer, compute_layout
from pml.model import Prompt, Schema
from pml.parser import parse_file
from pml.prompt import bind_prompt

__all__ = ["main", "build_parser", "add_commands"]

log = logging.getLogger(__name__)

# Called with a model name, or None for the default model; the engine's loader lives above this
# package (pml never imports it), so the caller passes it in.
TokenizerLoader = Callable[[str | None], Tokenizer]


def _no_loader(name: str | None) -> Tokenizer:
    raise RuntimeError("no tokenizer loader: token lengths need the engine, run this through the `pml` command")


class TokenizerLoadError(PMLError):
    """The tokenizer could not be loaded: a problem of the environment, not of any one file."""


class _Tokenizers:
    """Loads each tokenizer once, on first use; failures become PMLError (exit 2, no traceback)."""

    def __init__(self, loader: TokenizerLoader, default_model: str | None = None) -> None:
        self.loader = loader
        self.default_model = default_model
        self.cache: dict[str | None, Tokenizer] = {}

    def get(self, name: str | None) -> Tokenizer:
        name = name or self.default_model
        if name not in self.cache:
            try:
                self.cache[name] = self.loader(name)
            except Exception as e:  # noqa: BLE001 - any loader failure is reported, not traced
                raise TokenizerLoadError(f"cannot load tokenizer {name or 'of the default model'!r}: "
                                         f"{type(e).__name__}: {e}") from None
        return self.cache[name]


def _error_line(e: PMLError, file: str) -> str:
    return str(e.with_file(file))


def _cmd_validate(args: argparse.Namespace) -> int:
    toks: _Tokenizers = args.tokenizers
    model = args.model
    schema: Schema | None = None
    layout: Layout | None = None
    if args.schema:
        try:
            parsed = parse_file(args.schema)
            if not isinstance(parsed, Schema):
                raise PMLError("--schema must name a <schema> file, this is a <prompt>", file=args.schema)
            schema = parsed
        except PMLError as e:
            print(_error_line(e, args.schema), file=sys.stderr)
            return 2
    ok = True
    for file in args.files:
        try:
            doc = parse_file(file)
            if isinstance(doc, Schema) and args.model:
                compute_layout(doc, toks.get(model))  # scaffolds must fit their slots
            elif isinstance(doc, Prompt) and schema is not None:
                if layout is None:
                    tokenizer = toks.get(model)
                    try:
                        layout = compute_layout(schema, tokenizer)
                    except PMLError as e:
                        raise e.with_file(args.schema) from None
                bind_prompt(doc, layout, toks.get(model))
        except TokenizerLoadError:
            raise  # main prints it once, without blaming a file
        except PMLError as e:
            ok = False
            print(_error_line(e, file), file=sys.stderr)
        else:
            print(f"{file}: ok")
    return 0 if ok else 2


def _cmd_layout(args: argparse.Namespace) -> int:
    doc = parse_file(args.schema)
    if not isinstance(doc, Schema):
        raise PMLError("expected a <schema> file, this is a <prompt>", file=args.schema)
    layout = compute_layout(doc, args.tokenizers.get(args.model))
    rows = [
        # A parameter row is named `MODULE:PARAM`, so two slots of one module can be told apart.
        {"path": f"{s.path}:{s.name}" if s.kind == "parameter" else s.path, "kind": s.kind, "start": s.start,
         "end": s.end, "tokens": len(s.token_ids)}
        for s in layout.segments
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max([len("path")] + [len(r["path"] or "(root)") for r in rows])
    print(f"{'path':<{width}}  {'kind':<9}  {'start':>6}  {'end':>6}  {'tokens':>6}")
    for r in rows:
        print(f"{r['path'] or '(root)':<{width}}  {r['kind']:<9}  {r['start']:>6}  {r['end']:>6}  {r['tokens']:>6}")
    print(f"schema {layout.schema_name}: {layout.length} positions, {len(layout.modules)} modules")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``validate`` and ``layout`` on a subparsers object."""

    v = sub.add_parser(
        "validate",
        help="check schemas and prompts",
        description="Check PML files. A prompt is checked against --schema when given (token "
        "lengths with --model's tokenizer); a schema is laid out with --model when given.",
    )
    v.add_argument("files", nargs="+", metavar="FILE", help="schema or prompt files")
    v.add_argument("--schema", metavar="FILE", help="schema to check prompts against")
    v.add_argument("--model", metavar="NAME", help="tokenizer for length checks (default: the default model's)")
    v.set_defaults(func=_cmd_validate)

    lay = sub.add_parser("layout", help="show a schema's token layout", description="Print every segment's positions.")
    lay.add_argument("schema", metavar="SCHEMA", help="schema file")
    lay.add_argument("--model", metavar="NAME", help="tokenizer (default: the default model's)")
    lay.add_argument("--json", action="store_true", help="print JSON: one object per segment")
    lay.set_defaults(func=_cmd_layout)

    imp = sub.add_parser(
        "import-authors",
        help="convert PML in the paper authors' dialect to strict PML",
        description="Convert schemas and prompts written the way the Prompt Cache authors' code writes them "
        "(chat tags as text substitutions, raw < and &, ...) into strict PML, reporting every change.",
    )
    compat.add_arguments(imp)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pml", description="Prompt Markup Language tools (Prompt Cache).")
    add_commands(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None, *, tokenizer_loader: TokenizerLoader | None = None,
         parser: argparse.ArgumentParser | None = None, default_model: str | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input).

    ``parser`` defaults to the language commands alone (the ``pml`` console command passes its full
    parser); ``tokenizer_loader`` turns a model name (None: the default model) into a tokenizer.
    """
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    # `default_model` names the model used when --model is not given, for messages and the loader.
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    args.tokenizers = _Tokenizers(tokenizer_loader or _no_loader, default_model)
    try:
        return int(args.func(args) or 0)
    except PMLError as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
