"""Parse PML text into typed Schema / Prompt trees; pure (no tokenizer, no model).

Whitespace rule (applied to every run of text, see ``normalize_text``): whitespace-only runs
between elements are dropped; a run that starts on its own line loses the leading blank lines and
its common indentation (like ``textwrap.dedent``); trailing whitespace after the last newline
becomes exactly one ``"\\n"``; text that starts on the tag's line is kept as written. The last text
inside a chat tag loses that final ``"\\n"``, because the chat suffix ends the turn.
"""

from __future__ import annotations

import html.entities
import logging
import os
import re
import stat
from pathlib import Path

from lxml import etree

from pml import limits
from pml.errors import PMLError
from pml.model import (
    RESERVED_NAMES,
    ROLES,
    Chat,
    Module,
    ModuleRef,
    Parameter,
    Prompt,
    Schema,
    SchemaNode,
    Text,
    Union,
)

__all__ = ["parse_schema", "parse_prompt", "parse_file", "normalize_text", "is_ncname", "read_regular_file"]

log = logging.getLogger(__name__)

# XML 1.0 (5th edition) NameStartChar / NameChar without ':', i.e. an NCName.
_START = (
    "A-Z_a-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u02ff\u0370-\u037d\u037f-\u1fff\u200c-\u200d"
    "\u2070-\u218f\u2c00-\u2fef\u3001-\ud7ff\uf900-\ufdcf\ufdf0-\ufffd\U00010000-\U000effff"
)
_NCNAME = re.compile(f"[{_START}][{_START}\\-.0-9\u00b7\u0300-\u036f\u203f-\u2040]*")
_LEAD = re.compile(r"\s*\n")  # leading whitespace up to the last newline before the text
_TRAIL = re.compile(r"\n\s*\Z")  # trailing whitespace from the first newline after the text
# A declaration outside comments and CDATA; found before lxml sees the text, so that a hostile
# DTD is refused with a clear message instead of whatever the XML library makes of it.
_DECL = re.compile(rb"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<!(DOCTYPE|ENTITY|ELEMENT|ATTLIST)", re.DOTALL)
_DTD_MESSAGE = (
    "DOCTYPE, DTD and entity declarations are not allowed in PML (they could read files "
    "or expand without bound): remove the <!DOCTYPE ...> declaration"
)


# A str is already decoded, so the declaration's encoding= no longer describes it; lxml would
# trust it on the UTF-8 bytes we hand over (ISO-8859-1 would turn "café" into "cafÃ©").
_STR_DECL = re.compile(r"\A(\ufeff?<\?xml\b[^?]*?\bencoding\s*=\s*)([\"'])([^\"']*)\2")
_ENTITY = re.compile(r"Entity '([^']*)' not defined")
_MiB = 1024 * 1024


def _size(n: int) -> str:
    return f"{n / _MiB:g} MiB" if n >= _MiB and n % (_MiB // 16) == 0 else f"{n} bytes"


def _hint(msg: str) -> str:
    """One line on the usual cause of an lxml syntax error, or "" when there is no usual cause."""
    if "StartTag: invalid element name" in msg or "Unescaped '<'" in msg:
        return "a '<' that is text must be written &lt;, or wrap the text in <![CDATA[...]]>"
    if "EntityRef" in msg:
        return "a '&' that is text must be written &amp;"
    m = _ENTITY.search(msg)
    if m:
        name = m.group(1)
        char = html.entities.html5.get(name + ";")
        if char is not None and len(char) == 1:
            return f"&{name}; is an HTML entity, not XML: use the character itself or &#{ord(char)};"
        return "XML defines only &lt; &gt; &amp; &quot; &apos; and &#N;: write a literal '&' as &amp;"
    if "CharRef" in msg:
        return "a character reference is &#N; (decimal) or &#xN; (hexadecimal)"
    if "Specification mandates value" in msg or "Couldn't find end of Start Tag" in msg:
        return "if the '<' before this is text, write it &lt;"
    if "Opening and ending tag mismatch" in msg:
        return "every tag must be closed in order; a '<' in text opens a tag, so write it &lt;"
    return ""


def read_regular_file(path: str | os.PathLike[str], limit: int, what: str, advice: str) -> bytes:
    """Read a regular file of at most ``limit`` bytes; FIFOs, devices and larger files are refused.

    The type is checked with ``stat`` before opening, so a FIFO is never opened (opening one for
    reading blocks until a writer appears); ``what`` ("file", "src file ...") and ``advice`` go into
    the error message. Raises OSError for a missing or unreadable file.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise PMLError(f"{what} is not a regular file (a FIFO, device or folder): give a regular file")
    too_big = PMLError(
        f"{what} is larger than the {_size(limit)} limit ({advice})"
    )
    if st.st_size > limit:
        raise too_big
    # O_NONBLOCK: should the path be swapped for a FIFO after the stat, open still returns at once
    # and the fstat below refuses it.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise PMLError(f"{what} is not a regular file (a FIFO, device or folder): give a regular file")
        data = f.read(limit + 1)  # a file that grew since the stat is still read only this far
    if len(data) > limit:
        raise too_big
    return data


def _parser() -> etree.XMLParser:
    # Entities, DTDs and the network stay off: a PML file can neither read other files nor
    # expand into gigabytes (billion laughs); a DOCTYPE is rejected after parsing.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def is_ncname(name: str) -> bool:
    """Whether ``name`` is a valid XML NCName (an element name without a namespace prefix)."""
    return _NCNAME.fullmatch(name) is not None


def normalize_text(raw: str | None) -> str:
    """Apply the PML whitespace rule (module docstring) to one run of text; ``""`` means drop it."""
    if raw is None or not raw.strip():
        return ""
    lead = _LEAD.match(raw)
    body = raw[lead.end() :] if lead else raw
    trail = _TRAIL.search(body)
    if trail:
        body = body[: trail.start()]
    if lead:
        lines = body.split("\n")
        indents = [len(ln) - len(ln.lstrip(" \t")) for ln in lines if ln.strip()]
        cut = min(indents)
        # Only strip indentation that is the same characters on every line (tabs vs spaces).
        prefix = next(ln for ln in lines if ln.strip())[:cut]
        body = "\n".join(ln[cut:] if ln.startswith(prefix) else ln.lstrip(" \t") for ln in lines)
    return body + ("\n" if trail else "")


class _Ctx:
    """Where we are parsing: the file for messages and the folder ``src=`` is relative to."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.file = None if path is None else str(path)
        self.base = None if path is None else Path(path).resolve().parent

    def error(self, message: str, el: etree._Element | None = None, tag: str | None = None) -> PMLError:
        line = None if el is None else el.sourceline
        if tag is None and el is not None and isinstance(el.tag, str):
            tag = el.tag
        return PMLError(message, file=self.file, line=line, element=tag)


def _load(source: str | bytes, ctx: _Ctx) -> etree._Element:
    if isinstance(source, str):
        decl = _STR_DECL.match(source)
        if decl and decl.group(3).lower().replace("_", "-") not in ("utf-8", "utf8"):
            log.debug("ignoring encoding=%r of the XML declaration: the text is already decoded", decl.group(3))
            source = source[: decl.start(3)] + "UTF-8" + source[decl.end(3) :]
        try:
            source = source.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PMLError(f"text is not valid Unicode ({e.reason} at character {e.start})", file=ctx.file) from None
    if not isinstance(source, bytes):
        raise PMLError(f"expected XML text or bytes, got {type(source).__name__}", file=ctx.file)
    for m in _DECL.finditer(source):
        if m.group(1):
            line = 1 + source.count(b"\n", 0, m.start())
            raise PMLError(_DTD_MESSAGE, file=ctx.file, line=line, element="!" + m.group(1).decode())
    try:
        root = etree.fromstring(source, _parser())
    except etree.XMLSyntaxError as e:
        msg = e.msg or str(e)
        msg = re.sub(r"\s*\(<string>, line \d+\)$", "", msg)
        if "Excessive depth" in msg:
            raise PMLError(
                f"nesting deeper than {limits.MAX_NESTING_DEPTH} levels is not supported: flatten the document",
                file=ctx.file, line=e.lineno,
            ) from None
        hint = _hint(msg)
        raise PMLError(f"malformed XML: {msg}" + (f" (hint: {hint})" if hint else ""), file=ctx.file, line=e.lineno) from None
    except (etree.LxmlError, ValueError) as e:
        raise PMLError(f"malformed XML: {e}", file=ctx.file) from None
    if root is None:
        raise PMLError("empty document: expected <schema> or <prompt>", file=ctx.file)
    info = root.getroottree().docinfo
    if info.doctype or info.internalDTD is not None or info.externalDTD is not None:
        line = 1 + source[: max(source.find(b"<!DOCTYPE"), 0)].count(b"\n")
        raise PMLError(_DTD_MESSAGE, file=ctx.file, line=line, element="!DOCTYPE")
    return root


def _check_attrs(el: etree._Element, allowed: tuple[str, ...], ctx: _Ctx) -> None:
    for key in el.attrib:
        if key not in allowed:
            ok = ", ".join(allowed) if allowed else "none"
            raise ctx.error(f"unknown attribute {key!r} (allowed here: {ok})", el)


def _check_name(name: str | None, el: etree._Element, ctx: _Ctx, what: str) -> str:
    if name is None or name == "":
        raise ctx.error(f"{what} needs a name: add name=\"...\"", el)
    if not is_ncname(name):
        raise ctx.error(
            f"invalid {what} name {name!r}: use letters, digits, '-', '_' and '.', "
            "starting with a letter or '_' (an XML NCName)",
            el,
        )
    if what == "module" and name in RESERVED_NAMES:
        raise ctx.error(
            f"module name {name!r} is reserved (prompts reference modules by element name): "
            f"pick a name other than {', '.join(sorted(RESERVED_NAMES))}",
            el,
        )
    return name


def _tag(el: etree._Element, ctx: _Ctx) -> str:
    if not isinstance(el.tag, str):
        # With resolve_entities=False an entity reference stays in the tree as its own node.
        raise ctx.error(f"entity reference {el!s} is not allowed: write the text itself", el, "entity")
    if el.tag.startswith("{"):
        raise ctx.error(f"namespaced element {el.tag!r} is not PML: remove the namespace", el, el.tag)
    return el.tag


def _text_nodes(raw: str | None, line: int | None) -> list[Text]:
    text = normalize_text(raw)
    return [Text(text, line)] if text else []


# ----------------------------------------------------------------------------------------- schema


def _expect_root(root: etree._Element, ctx: _Ctx, want: str, attrs: tuple[str, ...]) -> None:
    """The root must be <want> with only `attrs`; a swapped schema/prompt gets a pointed hint."""
    tag = _tag(root, ctx)
    if tag != want:
        other = {"schema": "prompt", "prompt": "schema"}[want]
        hint = f" (this is a {other}: use parse_{other})" if tag == other else ""
        raise ctx.error(f"expected <{want}> at the root, found <{tag}>{hint}", root)
    _check_attrs(root, attrs, ctx)


class _SchemaParser:
    def __init__(self, ctx: _Ctx) -> None:
        self.ctx = ctx

    def schema(self, root: etree._Element) -> Schema:
        ctx = self.ctx
        _expect_root(root, ctx, "schema", ("name",))
        name = _check_name(root.get("name"), root, ctx, "schema")
        children = self.content(root, in_module=False, in_chat=False)
        self.check_scope(children, root)
        return Schema(name, tuple(children), ctx.file, root.sourceline)

    def content(self, el: etree._Element, *, in_module: bool, in_chat: bool) -> list[SchemaNode]:
        out: list[SchemaNode] = _text_nodes(el.text, el.sourceline)
        for child in el:
            out.append(self.node(child, el, in_module=in_module, in_chat=in_chat))
            out.extend(_text_nodes(child.tail, child.sourceline))
        if in_chat and out and isinstance(out[-1], Text) and out[-1].text.endswith("\n"):
            last = out[-1].text[:-1]
            out[-1:] = [Text(last, out[-1].line)] if last else []
        return out

    def node(self, el: etree._Element, parent: etree._Element, *, in_module: bool, in_chat: bool) -> SchemaNode:
        ctx = self.ctx
        tag = _tag(el, ctx)
        if tag == "module":
            return self.module(el)
        if tag == "union":
            return self.union(el)
        if tag == "parameter":
            if not in_module:
                raise ctx.error("<parameter> is only allowed inside a <module>: move it into one", el)
            return self.parameter(el)
        if tag in ROLES:
            if in_chat:
                raise ctx.error(f"chat tags do not nest: close <{parent.tag}> before opening <{tag}>", el)
            _check_attrs(el, (), ctx)
            return Chat(tag, tuple(self.content(el, in_module=in_module, in_chat=True)), el.sourceline)
        if tag in ("schema", "prompt"):
            raise ctx.error(f"<{tag}> is only allowed as the document root", el)
        raise ctx.error(
            f"unknown element <{tag}> in a schema: expected <module>, <union>, <parameter>, "
            "<system>, <user> or <assistant> (write literal '<' as &lt;)",
            el,
        )

    def module(self, el: etree._Element) -> Module:
        ctx = self.ctx
        _check_attrs(el, ("name", "cache", "src"), ctx)
        name = _check_name(el.get("name"), el, ctx, "module")
        cache_attr = el.get("cache", "true")
        if cache_attr not in ("true", "false"):
            raise ctx.error(f"cache must be \"true\" or \"false\", not {cache_attr!r}", el)
        src = el.get("src")
        if src is not None:
            if len(el) or (el.text and el.text.strip()):
                raise ctx.error(
                    f"module {name!r} has src={src!r} and content of its own: use one or the other", el
                )
            text = self.read_src(src, el)
            children: list[SchemaNode] = [Text(text, el.sourceline)] if text else []
        else:
            children = self.content(el, in_module=True, in_chat=False)
            self.check_scope(children, el)
        return Module(name, tuple(children), cache_attr == "true", src, el.sourceline)

    def read_src(self, src: str, el: etree._Element) -> str:
        ctx = self.ctx
        if ctx.base is None:
            raise ctx.error("src= needs the schema's file location: use parse_file or parse_schema(..., path=)", el)
        if src == "" or os.path.isabs(src) or src.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", src):
            raise ctx.error(f"src={src!r} must be a relative path inside the schema's folder", el)
        target = (ctx.base / src).resolve()
        if not target.is_relative_to(ctx.base):
            raise ctx.error(
                f"src={src!r} leaves the schema's folder {str(ctx.base)!r}: move the file next to the schema",
                el,
            )
        if not target.exists():
            raise ctx.error(f"src file {src!r} not found (looked for {str(target)!r})", el)
        try:
            data = read_regular_file(
                target, limits.MAX_SRC_FILE_BYTES, f"src file {src!r}",
                "pml.limits.MAX_SRC_FILE_BYTES: split the text over several modules",
            )
            text = data.decode("utf-8")
        except PMLError as e:
            raise ctx.error(e.message, el) from None
        except OSError as e:
            raise ctx.error(f"cannot read src file {src!r}: {e.strerror}", el) from None
        except UnicodeDecodeError as e:
            raise ctx.error(f"src file {src!r} is not UTF-8 text ({e.reason} at byte {e.start})", el) from None
        log.debug("module %s: loaded %d characters from %s", el.get("name"), len(text), target)
        return text

    def union(self, el: etree._Element) -> Union:
        ctx = self.ctx
        _check_attrs(el, ("scaffold",), ctx)
        if el.text and el.text.strip():
            raise ctx.error("a <union> holds only <module> members, not text: move the text into a member", el)
        members = []
        for child in el:
            tag = _tag(child, ctx)
            if tag != "module":
                raise ctx.error(f"a <union> holds only <module> members, not <{tag}>", child, "union")
            members.append(self.module(child))
            if child.tail and child.tail.strip():
                raise ctx.error("a <union> holds only <module> members, not text: move the text into a member", child, "union")
        if not members:
            raise ctx.error("empty <union>: add <module> members or remove it", el)
        scaffold = el.get("scaffold")
        names = [m.name for m in members]
        if scaffold is not None and scaffold not in names:
            raise ctx.error(f"scaffold {scaffold!r} is not a member of this union (members: {', '.join(names)})", el)
        return Union(tuple(members), scaffold, el.sourceline)

    def parameter(self, el: etree._Element) -> Parameter:
        ctx = self.ctx
        _check_attrs(el, ("name", "length", "scaffold"), ctx)
        name = _check_name(el.get("name"), el, ctx, "parameter")
        length = el.get("length")
        # Compared as digit strings: Python refuses int() of thousands of digits.
        digits = length.strip().lstrip("0") if length is not None and re.fullmatch(r"\s*[0-9]+\s*", length) else None
        if not digits:
            raise ctx.error(
                f"parameter {name!r} needs length=\"N\" with N a positive number of tokens, not {length!r}", el
            )
        if len(digits) > 12 or int(digits) > limits.MAX_PARAMETER_LENGTH:
            raise ctx.error(
                f"parameter {name!r} has length={length.strip()!r}, more than the limit of "
                f"{limits.MAX_PARAMETER_LENGTH} tokens (pml.limits.MAX_PARAMETER_LENGTH): use a smaller length",
                el,
            )
        if len(el) or (el.text and el.text.strip()):
            raise ctx.error(f"parameter {name!r} takes no content: put default text in scaffold=\"...\"", el)
        scaffold = el.get("scaffold")
        if scaffold is not None and not scaffold.strip():
            raise ctx.error(f"parameter {name!r} has an empty scaffold: give text or remove the attribute", el)
        return Parameter(name, int(digits), scaffold, el.sourceline)

    def check_scope(self, children: list[SchemaNode], el: etree._Element) -> None:
        """Module names are unique among siblings, union members and chat contents included."""
        seen: dict[str, int | None] = {}
        params: set[str] = set()

        def walk(nodes: tuple[SchemaNode, ...] | list[SchemaNode]) -> None:
            for n in nodes:
                if isinstance(n, Chat):
                    walk(n.children)
                elif isinstance(n, Union):
                    walk(n.members)
                elif isinstance(n, Module):
                    if n.name in seen:
                        raise PMLError(
                            f"duplicate module name {n.name!r} in this scope (first defined on line "
                            f"{seen[n.name]}): names must be unique among siblings, union members included",
                            self.ctx.file, n.line, "module",
                        )
                    seen[n.name] = n.line
                elif isinstance(n, Parameter):
                    if n.name in params:
                        raise PMLError(f"duplicate parameter name {n.name!r} in this module", self.ctx.file, n.line, "parameter")
                    params.add(n.name)

        walk(children)


def parse_schema(source: str | bytes, *, path: str | os.PathLike[str] | None = None) -> Schema:
    """Parse a ``<schema>``; ``path`` names the file in errors and anchors ``src=`` files."""
    ctx = _Ctx(path)
    return _SchemaParser(ctx).schema(_load(source, ctx))


# ----------------------------------------------------------------------------------------- prompt


class _PromptParser:
    def __init__(self, ctx: _Ctx) -> None:
        self.ctx = ctx

    def prompt(self, root: etree._Element) -> Prompt:
        ctx = self.ctx
        _expect_root(root, ctx, "prompt", ("schema",))
        schema = root.get("schema")
        if not schema:
            raise ctx.error("<prompt> needs the schema it uses: add schema=\"...\"", root)
        out: list = _text_nodes(root.text, root.sourceline)
        for child in root:
            t = _tag(child, ctx)
            if t in ROLES:
                out.append(self.chat(child))
            else:
                out.append(self.ref(child, top=True))
            out.extend(_text_nodes(child.tail, child.sourceline))
        self.check_unique([n for n in out if isinstance(n, ModuleRef)])
        return Prompt(schema, tuple(out), ctx.file, root.sourceline)

    def chat(self, el: etree._Element) -> Chat:
        ctx = self.ctx
        _check_attrs(el, (), ctx)
        if len(el):
            child = el[0]
            raise ctx.error(
                f"<{_tag(child, ctx)}> inside <{el.tag}>: in a prompt, chat tags hold text only "
                "(reference modules at the prompt's top level)",
                child,
            )
        text = normalize_text(el.text)
        if text.endswith("\n"):
            text = text[:-1]
        return Chat(el.tag, (Text(text, el.sourceline),) if text else (), el.sourceline)

    def ref(self, el: etree._Element, *, top: bool) -> ModuleRef:
        ctx = self.ctx
        tag = _tag(el, ctx)
        if tag in ("module", "union", "parameter"):
            raise ctx.error(
                f"<{tag}> belongs in a schema; a prompt selects a module by its name (<name/>) "
                "and passes parameters as attributes (<name param=\"value\"/>)",
                el,
            )
        if tag in ("schema", "prompt"):
            raise ctx.error(f"<{tag}> is only allowed as the document root", el)
        if tag in ROLES:
            raise ctx.error(f"chat tag <{tag}> inside a module reference: move it to the prompt's top level", el)
        if not is_ncname(tag):  # unreachable with lxml, kept for clarity
            raise ctx.error(f"invalid module reference <{tag}>", el)
        if el.text and el.text.strip():
            raise ctx.error(
                f"text inside module reference <{tag}>: a reference selects the schema's text; "
                "put new text outside it, at the prompt's top level",
                el,
            )
        args = []
        for key, value in el.attrib.items():
            if key.startswith("{"):
                raise ctx.error(f"namespaced attribute {key!r} is not a parameter: remove the namespace", el)
            args.append((key, value))
        children = []
        for child in el:
            children.append(self.ref(child, top=False))
            if child.tail and child.tail.strip():
                raise ctx.error(
                    f"text inside module reference <{tag}>: put new text at the prompt's top level", child, tag
                )
        self.check_unique(children)
        return ModuleRef(tag, tuple(args), tuple(children), el.sourceline)

    def check_unique(self, refs: list[ModuleRef]) -> None:
        seen: set[str] = set()
        for r in refs:
            if r.name in seen:
                raise PMLError(f"module {r.name!r} is referenced twice: select it once", self.ctx.file, r.line, r.name)
            seen.add(r.name)


def parse_prompt(source: str | bytes, *, path: str | os.PathLike[str] | None = None) -> Prompt:
    """Parse a ``<prompt>``; ``path`` only names the file in errors."""
    ctx = _Ctx(path)
    return _PromptParser(ctx).prompt(_load(source, ctx))


def parse_file(path: str | os.PathLike[str]) -> Schema | Prompt:
    """Parse a file holding either a ``<schema>`` or a ``<prompt>`` (decided by its root element)."""
    ctx = _Ctx(path)
    try:
        data = read_regular_file(
            path, limits.MAX_PML_FILE_BYTES, "file",
            "pml.limits.MAX_PML_FILE_BYTES: move long text into <module src=\"...\"> files",
        )
    except PMLError as e:
        raise e.with_file(str(path)) from None
    except OSError as e:
        raise PMLError(f"cannot read file: {e.strerror}", file=str(path)) from None
    root = _load(data, ctx)
    if isinstance(root.tag, str) and root.tag == "prompt":
        return _PromptParser(ctx).prompt(root)
    if isinstance(root.tag, str) and root.tag == "schema":
        return _SchemaParser(ctx).schema(root)
    raise ctx.error(f"expected <schema> or <prompt> at the root, found <{root.tag}>", root)
