"""Evaluation data on disk: where it lives and typed loaders for LongBench, MuSiQue and L-Eval JSON lines.

The data is read in place (never copied into the repository) from, in order: the `--data DIR`
flag, the `PML_DATA` environment variable, or `../shared/data` next to the repository root (the
folder holding `pyproject.toml`). Formats are described in that folder's README.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ENV_VAR = "PML_DATA"


def repo_root() -> Path:
    """The folder holding `pyproject.toml` (this package's checkout)."""
    here = Path(__file__).resolve().parent
    for parent in (here, *here.parents):
        if (parent / "pyproject.toml").is_file():
            return parent
    return here.parent


def data_dir(flag: str | os.PathLike | None = None) -> Path:
    """The data folder: `flag`, else `$PML_DATA`, else `<repo root>/../shared/data`; must exist."""
    if flag:
        path, origin = Path(flag).expanduser(), "--data"
    elif os.environ.get(ENV_VAR):
        path, origin = Path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}"
    else:
        path, origin = (repo_root() / ".." / "shared" / "data").resolve(), "the default"
    if not path.is_dir():
        raise FileNotFoundError(
            f"evaluation data folder {path} (from {origin}) does not exist: pass --data DIR or set "
            f"{ENV_VAR} to the folder holding longbench/, longbench_mini/, multidoc/ and leval/")
    return path


@dataclass(frozen=True)
class Passage:
    title: str
    text: str


@dataclass(frozen=True)
class Record:
    """One LongBench-style item: a long context, a question or instruction, gold answers."""

    id: str
    task: str  # LongBench dataset name (e.g. "multi_news", "hotpotqa"); decides template and metric
    input: str  # question / instruction ("" for pure summarization)
    context: str  # the long document
    answers: tuple[str, ...]
    all_classes: tuple[str, ...] = ()  # trec's label set; empty elsewhere
    passages: tuple[Passage, ...] | None = None  # separate paragraphs where the source keeps them


@dataclass(frozen=True)
class LevalDoc:
    """One L-Eval document with its many questions (parallel `instructions` / `outputs`)."""

    id: str
    task: str  # file stem, e.g. "coursera"
    document: str
    instructions: tuple[str, ...]
    outputs: tuple[str, ...]
    evaluation: str  # "exam" (multiple choice), "f1" or "rouge"


def _lines(path: Path, limit: int | None) -> Iterator[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"no data file {path}")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f):
            if limit is not None and n >= limit:
                return
            if line.strip():
                yield json.loads(line)


def _classes(value) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, list) else ()


def load_longbench(path: Path, limit: int | None = None) -> list[Record]:
    """LongBench JSON lines (`longbench/*.jsonl` or `longbench_mini/*.jsonl`); task = `dataset` field."""
    out = []
    for n, r in enumerate(_lines(path, limit)):
        task = r.get("dataset") or path.stem
        out.append(Record(id=str(r.get("_id") or f"{path.stem}-{n}"), task=task, input=r.get("input") or "",
                          context=r["context"], answers=tuple(r["answers"]),
                          all_classes=_classes(r.get("all_classes"))))
    return out


def load_musique(path: Path, limit: int | None = None) -> list[Record]:
    """MuSiQue with one `{title, text}` per paragraph (`multidoc/musique_train100_longbench_style.jsonl`)."""
    out = []
    for n, r in enumerate(_lines(path, limit)):
        passages = tuple(Passage(p["title"], p["text"]) for p in r["passages"])
        out.append(Record(id=str(r.get("_id") or f"musique-{n}"), task="musique", input=r["input"],
                          context=r["context"], answers=tuple(r["answers"]), passages=passages))
    return out


def load_leval(path: Path, limit: int | None = None) -> list[LevalDoc]:
    """L-Eval raw JSON lines: one document per line with parallel questions and answers."""
    out = []
    for n, r in enumerate(_lines(path, limit)):
        inst, outs = tuple(r["instructions"]), tuple(r["outputs"])
        if len(inst) != len(outs):
            raise ValueError(f"{path}:{n + 1}: {len(inst)} instructions but {len(outs)} outputs")
        out.append(LevalDoc(id=f"{path.stem}-{n}", task=path.stem, document=r["input"], instructions=inst,
                            outputs=outs, evaluation=r.get("evaluation", "rouge")))
    return out


def split_passages(context: str) -> tuple[str, ...] | None:
    """Cut a LongBench multi-document context at its `Passage N:` headers (each piece keeps its header).

    Returns None when the context does not start with `Passage 1:`. The pieces concatenate back to
    `context` exactly.
    """
    import re

    starts = [m.start() for m in re.finditer(r"(?m)^Passage \d+:\n", context)]
    if not starts or starts[0] != 0:
        return None
    ends = starts[1:] + [len(context)]
    return tuple(context[a:b] for a, b in zip(starts, ends))
