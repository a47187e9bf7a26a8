"""Import PML written for the paper authors' implementation (yale-sys/prompt-cache) as strict PML.

Their dialect differs from ours in ways that make most of their files fail here (docs/PML.md,
"Coming from the authors' PML"): chat tags are text substituted before XML parsing, so a turn may
open in the schema and close in the prompt; their parser recovers from raw ``<`` and ``&`` by
dropping them; text runs keep one space for their surrounding whitespace. ``convert`` rewrites a
document and returns every change as a ``Change``; the result always parses with ``pml.parser``.
"""

from __future__ import annotations

import argparse
import bisect
import html.entities
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from pml import limits
from pml.errors import PMLError
from pml.model import RESERVED_NAMES, ROLES
from pml.parser import _Ctx, _load, parse_prompt, parse_schema, read_regular_file

__all__ = ["Change", "Conversion", "convert", "convert_file", "add_arguments", "run"]

log = logging.getLogger(__name__)

# Their FormatConversation replaces exactly these strings before parsing (str.replace).
_CHAT = {f"<{r}>": (r, "open") for r in ROLES} | {f"</{r}>": (r, "close") for r in ROLES} | {"<system/>": ("system", "empty")}
_MARK = "pml-compat-chat"  # stand-in element for a chat marker while the tree is walked
_XML_REFS = ("lt", "gt", "amp", "quot", "apos")
_TOKEN = re.compile(
    r"""(?P<skip><!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>|<!DOCTYPE)
    |(?P<chat></?(?:system|user|assistant)>|<system/>)
    |(?P<tag></?[A-Za-z_][\w.\-]*(?:\s+[^\s=/<>"']+\s*=\s*(?:"[^"]*"|'[^']*'))*\s*/?>)
    |(?P<lt><)
    |(?P<ref>&(?:(?P<name>[A-Za-z_][\w.\-]*)|\#[0-9]+|\#x[0-9A-Fa-f]+);)
    |(?P<amp>&)""",
    re.S | re.X,
)
_ATTR_AMP = re.compile(r"&(?!(?:[A-Za-z_][\w.\-]*|#[0-9]+|#x[0-9A-Fa-f]+);)")


@dataclass(frozen=True)
class Change:
    """One edit the importer made: where (input line), what, why, and whether tokens stay the same.

    ``same_tokens`` is False when the converted PML lays out different tokens than the authors'
    code did for this construct (a difference our PML cannot express); True for spelling only.
    """

    line: int | None
    what: str
    why: str
    same_tokens: bool = True

    def format(self, file: str) -> str:
        """``FILE:LINE: note: WHAT (WHY)``, the line the ``pml import-authors`` command prints."""
        where = f"{file}:{self.line}:" if self.line is not None else f"{file}:"
        return f"{where} note: {self.what} ({self.why})"


@dataclass(frozen=True)
class Conversion:
    """A converted document: ``kind`` is ``"schema"`` or ``"prompt"``; ``text`` parses as strict PML."""

    kind: str
    text: str
    changes: tuple[Change, ...]


def _compact(text: str) -> str:
    # Their compact_surrounding_spaces: leading and trailing whitespace become one space each.
    return re.sub(r"^\s+|\s+$", " ", text)


class _Importer:
    def __init__(self, file: str | None) -> None:
        self.file = file
        self.changes: list[Change] = []
        self.newlines: list[int] = []

    def note(self, line: int | None, what: str, why: str, same_tokens: bool = True) -> None:
        self.changes.append(Change(line, what, why, same_tokens))

    def error(self, message: str, line: int | None, element: str | None) -> PMLError:
        return PMLError(message, self.file, line, element)

    # ------------------------------------------------------------------------------ lexical pass

    def line_at(self, offset: int) -> int:
        return 1 + bisect.bisect_right(self.newlines, offset - 1)

    def lex(self, text: str) -> str:
        """Escape raw '<' and '&', replace HTML entities, and turn chat markers into stand-ins."""
        self.newlines = [m.start() for m in re.finditer("\n", text)]
        out: list[str] = []
        pos = 0
        for m in _TOKEN.finditer(text):
            out.append(text[pos : m.start()])
            pos = m.end()
            line = self.line_at(m.start())
            kind = m.lastgroup if m.lastgroup != "name" else "ref"
            tok = m.group()
            if kind == "chat":
                role, edge = _CHAT[tok]
                out.append(f'<{_MARK} role="{role}" edge="{edge}"/>')
            elif kind == "tag":
                out.append(self.fix_attributes(tok, line))
            elif kind == "lt":
                out.append("&lt;")
                self.note(line, "escaped a raw '<' as &lt;", "their parser's recovery mode drops it", False)
            elif kind == "amp":
                out.append("&amp;")
                self.note(line, "escaped a raw '&' as &amp;", "their parser's recovery mode drops it", False)
            elif kind == "ref" and m.group("name") and m.group("name") not in _XML_REFS:
                name = m.group("name")
                char = html.entities.html5.get(name + ";")
                if char is None:
                    out.append("&amp;" + tok[1:])
                    self.note(line, f"escaped '&' of the unknown entity {tok} as &amp;", "XML defines no such entity", False)
                else:
                    out.append("".join(f"&#{ord(c)};" for c in char))
                    self.note(line, f"replaced the HTML entity {tok} by the character it names", "XML defines no such entity; their parser drops it", False)
            else:
                out.append(tok)
        out.append(text[pos:])
        return "".join(out)

    def fix_attributes(self, tag: str, line: int) -> str:
        def fix(m: re.Match[str]) -> str:
            quote, value = m.group(1), m.group(2)
            fixed = _ATTR_AMP.sub("&amp;", value).replace("<", "&lt;")
            if fixed != value:
                self.note(line, "escaped '<' or '&' in an attribute value", "XML requires it", True)
            return quote + fixed + quote

        return re.sub(r"""(["'])(.*?)\1""", fix, tag, flags=re.S)

    # -------------------------------------------------------------------------------- the walk

    def items(self, el: etree._Element) -> list:
        """``el``'s content as ("text", str, line) | ("mark", role, edge, line) | ("el", element)."""
        out: list = []
        if el.text:
            out.append(("text", el.text, el.sourceline))
        for child in el:
            if child.tag == _MARK:
                out.append(("mark", child.get("role"), child.get("edge"), child.sourceline))
            else:
                out.append(("el", child))
            if child.tail:
                out.append(("text", child.tail, child.sourceline))
        return out

    def text_into(self, parent: etree._Element, text: str, line: int | None, where: str) -> None:
        if not text.strip():
            if text:
                self.note(line, f"dropped a whitespace-only text run {where}",
                          "their parser encodes it as one space token; PML drops whitespace between elements", False)
            return
        _append_text(parent, _compact(text))

    def schema_content(self, src: etree._Element, out: etree._Element, *, root: bool) -> None:
        turn: tuple[str, int | None, etree._Element] | None = None
        where = f"in <{src.tag}{_name_attr(src)}>"
        items = self.items(src)
        if not root and items and all(it[0] == "text" and not it[1].strip() for it in items):
            self.note(src.sourceline, f"module {src.get('name')!r} holds only whitespace: written empty",
                      "their parser encodes it as one space token; in PML it has no tokens", False)
            return
        for item in items:
            target = turn[2] if turn else out
            if item[0] == "text":
                self.text_into(target, item[1], item[2], where)
            elif item[0] == "el":
                self.schema_element(item[1], target)
            else:
                _, role, edge, line = item
                if edge == "empty":
                    self.note(line, "removed <system/>", "it meant 'no system prompt' (a model-specific opener); "
                              "in PML <system/> is an empty system turn and no system prompt is written as nothing", False)
                elif edge == "open":
                    if turn is not None:
                        raise self.error(f"<{role}> opens while <{turn[0]}> from line {turn[1]} is still open: "
                                         "PML chat turns do not nest; close the first turn", line, role)
                    turn = (role, line, etree.SubElement(out, role))
                elif turn is not None and turn[0] == role:
                    turn = None
                else:
                    raise self.error(f"</{role}> closes a turn that was not opened in the same element {where}: "
                                     "PML chat turns must enclose whole elements", line, role)
        if turn is not None:
            if not root:
                raise self.error(f"<{turn[0]}> is not closed {where}: PML chat turns must enclose whole elements",
                                 turn[1], turn[0])
            self.note(turn[1], f"closed <{turn[0]}> at the end of the schema",
                      "their turn stays open into the prompt; a PML turn ends in the document that opens it, "
                      "so the turn's suffix is added here and the prompt reopens the turn", False)

    def schema_element(self, el: etree._Element, out: etree._Element) -> None:
        tag, line = el.tag, el.sourceline
        if not isinstance(tag, str):
            return
        if tag == "module":
            self.module(el, out)
        elif tag == "union":
            self.union(el, out)
        elif tag == "parameter":
            self.parameter(el, out)
        elif tag in ("schema", "prompt", *ROLES):
            raise self.error(f"<{tag}> is not allowed here", line, tag)
        else:
            markup = etree.tostring(el, encoding="unicode", with_tail=False)
            _append_text(out, markup)
            self.note(line, f"kept the unknown element <{tag}> as literal text",
                      "their parser tokenizes its markup; PML has no such element", False)

    def attrs(self, el: etree._Element, allowed: tuple[str, ...]) -> dict[str, str]:
        kept = {}
        for key, value in el.attrib.items():
            if key in allowed:
                kept[key] = value
            else:
                self.note(el.sourceline, f"removed the attribute {key}={value!r} of <{el.tag}>",
                          "their parser ignores it; PML refuses unknown attributes")
        return kept

    def module(self, el: etree._Element, out: etree._Element) -> None:
        line = el.sourceline
        a = self.attrs(el, ("name", "cache", "src"))
        name = a.get("name")
        if not name:
            raise self.error("module needs a name: add name=\"...\"", line, "module")
        if name in RESERVED_NAMES:
            raise self.error(f"module name {name!r} is reserved in PML (prompts select modules by element name): "
                             "rename it in the schema and its prompts", line, "module")
        if "cache" in a and a["cache"] not in ("true", "false"):
            self.note(line, f"wrote cache={a['cache']!r} as cache=\"false\"", "their parser caches only on \"true\"")
            a["cache"] = "false"
        m = etree.SubElement(out, "module", a)
        if "src" in a:
            src = a["src"]
            if len(el) or (el.text and el.text.strip()):
                raise self.error(f"module {name!r} has src= and content: their parser concatenates them, PML takes "
                                 "one or the other; move the content into a nested module", line, "module")
            if src.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", src) or ".." in Path(src).parts:
                raise self.error(f"src={src!r} must be a relative path inside the schema's folder in PML: "
                                 "copy the file next to the schema", line, "module")
            self.note(line, f"kept src={src!r}: check it is relative to the converted schema's folder",
                      "their src= is relative to the current folder and its text loses surrounding whitespace; "
                      "PML's is relative to the schema's folder and used verbatim", False)
            return
        self.schema_content(el, m, root=False)

    def union(self, el: etree._Element, out: etree._Element) -> None:
        u = etree.SubElement(out, "union", self.attrs(el, ("scaffold",)))
        for item in self.items(el):
            if item[0] == "el" and item[1].tag == "module":
                self.module(item[1], u)
            elif item[0] == "el":
                raise self.error(f"a <union> holds only <module> members, not <{item[1].tag}>", item[1].sourceline, "union")
            elif item[0] == "mark" or item[1].strip():
                self.note(item[-1], "removed text or a chat tag directly inside <union>", "their parser ignores it too")

    def parameter(self, el: etree._Element, out: etree._Element) -> None:
        line = el.sourceline
        a = self.attrs(el, ("name", "length", "scaffold", "len"))
        if "len" in a and "length" not in a:
            a["length"] = a.pop("len")
            self.note(line, "renamed len= to length=", "PML and their parser read length=")
        a.pop("len", None)
        try:
            n = int(a.get("length", ""))
        except ValueError:
            raise self.error(f"parameter needs length=\"N\", a number of tokens, not {a.get('length')!r}", line, "parameter") from None
        if str(n) != a["length"]:
            self.note(line, f"wrote length={a['length']!r} as length=\"{n}\"", "PML takes a plain number")
            a["length"] = str(n)
        if "scaffold" in a and not a["scaffold"].strip():
            del a["scaffold"]
            self.note(line, "removed an empty scaffold", "it encodes to no tokens; PML refuses it")
        if "scaffold" not in a:
            self.note(line, f"parameter {a.get('name')!r} has no scaffold",
                      "their cache fills the slot with unknown tokens and a prompt without a value leaves it empty; "
                      "PML needs a value in every prompt that selects the module (or add scaffold=\"...\")", False)
        if len(el) or (el.text and el.text.strip()):
            self.note(line, "removed content inside <parameter>", "their parser ignores it")
        etree.SubElement(out, "parameter", a)

    # ------------------------------------------------------------------------------- documents

    def schema(self, root: etree._Element) -> etree._Element:
        a = self.attrs(root, ("name",))
        out = etree.Element("schema", a)
        self.schema_content(root, out, root=True)
        return out

    def prompt(self, root: etree._Element) -> etree._Element:
        a = self.attrs(root, ("schema",))
        if not a.get("schema"):
            raise self.error("<prompt> has no schema=: their text-only prompts have no PML form; add schema=\"...\"",
                             root.sourceline, "prompt")
        out = etree.Element("prompt", a)
        items = self.items(root)
        refs = [i for i, it in enumerate(items) if it[0] == "el"]
        last = refs[-1] if refs else -1
        turn: tuple[str, int | None, etree._Element] | None = None
        pending: list[tuple[str, int | None]] = []  # text since the last boundary, for a lone </user>

        def flush() -> None:
            for text, line in pending:
                _append_text(turn[2] if turn else out, text)
            pending.clear()

        for i, item in enumerate(items):
            if item[0] == "el":
                flush()
                out.append(self.ref(item[1]))
                continue
            line = item[-1]
            if i < last:
                if item[0] == "mark" or item[1].strip():
                    before = not refs or i < refs[0]
                    if before:  # their parser refuses it; keeping it is the likely intent
                        self.keep_prompt_item(item, out, pending)
                        self.note(line, "kept text or a chat tag before the first module reference",
                                  "their parser refuses a prompt with leading text", False)
                    else:
                        self.note(line, "removed text or a chat tag between module references",
                                  "their parser keeps only the text after the last reference")
                continue
            if item[0] == "text":
                # Their prompt text is the tail after the last reference, stripped; PML's whitespace
                # rule would trim each piece around a chat tag anyway, so every piece is stripped.
                if item[1].strip():
                    pending.append((item[1].strip(), line))
                continue
            _, role, edge, line = item
            if edge == "empty":
                self.note(line, "removed <system/>", "it meant 'no system prompt'", False)
            elif edge == "open":
                if turn is not None:
                    raise self.error(f"<{role}> opens while <{turn[0]}> from line {turn[1]} is still open", line, role)
                flush()
                turn = (role, line, etree.SubElement(out, role))
            elif turn is not None and turn[0] == role:
                flush()
                turn = None
            elif turn is None:
                # A turn opened in the schema ends here: its text becomes a turn of the prompt's own.
                t = etree.SubElement(out, role)
                for text, _ in pending:
                    _append_text(t, text.strip())
                pending.clear()
                self.note(line, f"made the text before </{role}> a <{role}> turn",
                          "the turn was opened in the schema; PML adds the turn's prefix here", False)
            else:
                raise self.error(f"</{role}> closes <{turn[0]}> from line {turn[1]}", line, role)
        if turn is not None and turn[0] == "assistant":
            out.remove(turn[2])
            turn = None
            self.note(line, "removed the open <assistant> at the end",
                      "PML appends the assistant prefix after all of a prompt's text; text after it now comes first",
                      not pending)
        elif turn is not None:
            self.note(turn[1], f"closed <{turn[0]}> at the end of the prompt", "PML turns are closed", False)
        flush()
        return out

    def keep_prompt_item(self, item: tuple, out: etree._Element, pending: list) -> None:
        if item[0] == "text":
            _append_text(out, item[1].strip())
        elif item[2] != "empty":
            raise self.error(f"chat tag <{item[1]}> before the first module reference: move it after them",
                             item[-1], item[1])

    def ref(self, el: etree._Element) -> etree._Element:
        if el.tag == _MARK:
            raise self.error("a chat tag inside a module reference: move it after the references", el.sourceline, "prompt")
        out = etree.Element(el.tag, dict(el.attrib))
        for child in el:
            out.append(self.ref(child))
        return out


def _name_attr(el: etree._Element) -> str:
    name = el.get("name")
    return f" name={name!r}" if name else ""


def _append_text(parent: etree._Element, text: str) -> None:
    if len(parent):
        parent[-1].tail = (parent[-1].tail or "") + text
    else:
        parent.text = (parent.text or "") + text


def convert(source: str | bytes, *, path: str | None = None) -> Conversion:
    """Convert one schema or prompt in the authors' dialect to strict PML (rules in docs/PML.md).

    Raises PMLError (naming ``path``, the input line and the construct) for what PML cannot express.
    """
    imp = _Importer(None if path is None else str(path))
    if isinstance(source, bytes):
        decl = re.match(rb"\s*<\?xml[^>]*encoding\s*=\s*[\"']([A-Za-z0-9._-]+)", source)
        try:
            source = source.decode(decl.group(1).decode() if decl else "utf-8")
        except (LookupError, UnicodeDecodeError) as e:
            raise PMLError(f"cannot decode the file: {e}", imp.file) from None
    decl = re.match(r"\ufeff?\s*<\?xml[^>]*\?>", source)
    if decl:
        # Blanked, not removed, so that line numbers stay those of the input.
        source = "\n" * source.count("\n", 0, decl.end()) + source[decl.end() :]
    root = _load(imp.lex(source), _Ctx(path))
    if root.tag == "schema":
        out, kind = imp.schema(root), "schema"
    elif root.tag == "prompt":
        out, kind = imp.prompt(root), "prompt"
    else:
        raise imp.error(f"expected <schema> or <prompt> at the root, found <{root.tag}>", root.sourceline, str(root.tag))
    etree.indent(out, space="  ")
    text = etree.tostring(out, encoding="unicode") + "\n"
    check = etree.fromstring(text)
    for m in check.iter("module"):
        # src= files are read relative to where the converted schema will live, not known here.
        m.attrib.pop("src", None)
    try:
        # The output must be strict PML; a failure here is a construct the importer let through.
        if kind == "schema":
            parse_schema(etree.tostring(check, encoding="unicode"))
        else:
            parse_prompt(text)
    except PMLError as e:
        raise PMLError(f"the converted {kind} is not valid PML: {e.message}", imp.file, None, e.element) from None
    log.debug("converted %s: %d changes", path, len(imp.changes))
    changes = sorted(imp.changes, key=lambda c: c.line or 0)  # stable: same-line notes keep their order
    return Conversion(kind, text, tuple(changes))


def convert_file(path: str | Path) -> Conversion:
    """``convert`` the file at ``path`` (a regular file within ``pml.limits.MAX_PML_FILE_BYTES``)."""
    try:
        data = read_regular_file(path, limits.MAX_PML_FILE_BYTES, "file", "pml.limits.MAX_PML_FILE_BYTES")
    except PMLError as e:
        raise e.with_file(str(path)) from None
    except OSError as e:
        raise PMLError(f"cannot read file: {e.strerror}", str(path)) from None
    return convert(data, path=str(path))


# ------------------------------------------------------------------------------------ command line

OUT_FOLDER = "pml-imported"  # default output folder, created beside each input


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pml import-authors FILE... [--out DIR]``."""
    parser.add_argument("files", nargs="+", metavar="FILE", help="schemas or prompts in the authors' PML")
    parser.add_argument("--out", metavar="DIR",
                        help=f"folder for the converted files (default: {OUT_FOLDER}/ beside each input); "
                        "'-' prints them to stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Convert ``args.files``; print ``IN -> OUT`` and one ``FILE:LINE: note: WHAT (WHY)`` per change.

    Each output is named like its input with the suffix ``.pml``. An input is never overwritten.
    Errors print as one PMLError line on stderr; returns 0 if every file converted, else 2.
    """
    inputs = {Path(f).resolve() for f in args.files}
    written: set[Path] = set()
    ok = True
    for file in args.files:
        try:
            conv = convert_file(file)
            if args.out == "-":
                print(conv.text, end="")
                dest = None
            else:
                folder = Path(args.out) if args.out else Path(file).parent / OUT_FOLDER
                dest = folder / (Path(file).stem + ".pml")
                if dest.resolve() in inputs or dest.resolve() in written:
                    what = "an input file" if dest.resolve() in inputs else "the output of another input"
                    raise PMLError(f"output {str(dest)!r} would overwrite {what}: choose another --out", file)
                written.add(dest.resolve())
                folder.mkdir(parents=True, exist_ok=True)
                dest.write_text(conv.text, encoding="utf-8")
        except PMLError as e:
            ok = False
            print(str(e.with_file(file)), file=sys.stderr)
            continue
        if dest is not None:
            print(f"{file} -> {dest}")
        for c in conv.changes:
            print(c.format(file), file=sys.stderr if args.out == "-" else sys.stdout)
    return 0 if ok else 2
