"""The paper's reference numbers, read from `../shared/reference/paper_results.md` (never copied here).

`load()` parses the per-task table of that file: the authors' baseline and cached scores and their
recorded TTFT, per model and LongBench task.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "PML_PAPER_RESULTS"


@dataclass(frozen=True)
class PaperRow:
    model: str  # e.g. "Llama-2-7B"
    task: str  # LongBench task name
    n: int
    baseline: float  # task score x100, without the cache
    cached: float  # with the cache
    ttft_base_ms: float  # authors' GPU runs: cache_time + response_time
    ttft_cache_ms: float

    @property
    def delta(self) -> float:
        return round(self.cached - self.baseline, 1)

    @property
    def ttft_speedup(self) -> float:
        return self.ttft_base_ms / self.ttft_cache_ms


def default_path() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    root = Path(__file__).resolve().parent.parent
    return (root / ".." / "shared" / "reference" / "paper_results.md").resolve()


def load(path: str | os.PathLike | None = None) -> list[PaperRow]:
    """Rows of the per-task table; a clear error if the file or the table is missing."""
    path = Path(path) if path else default_path()
    if not path.is_file():
        raise FileNotFoundError(f"paper reference file not found: {path} (set ${ENV_VAR} or pass --reference)")
    rows = []
    header = None
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            if cells[:2] == ["model", "task"]:
                header = cells
            continue
        if not line.startswith("|"):
            break
        if set("".join(cells)) <= set("-: "):
            continue
        r = dict(zip(header, cells))
        rows.append(PaperRow(r["model"], r["task"], int(r["n"]), float(r["baseline"]), float(r["with cache"]),
                             float(r["TTFT base ms"]), float(r["TTFT cache ms"])))
    if not rows:
        raise ValueError(f"{path}: no per-task table (a header row starting '| model | task |') found")
    return rows
