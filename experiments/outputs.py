"""Where experiment results go and in what form: resumable JSON lines, a CSV summary, a Markdown report.

A run directory holds `items.jsonl` (one object per finished item, appended and flushed as each
finishes, so an interrupted run resumes where it stopped), `summary.csv`, PNG plots and
`report.md` stating model, dtype, machine, command and date.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Iterable

DEFAULT_RUNS = Path("runs")


def run_dir(name: str, out: str | os.PathLike | None = None) -> Path:
    """`out` if given, else `runs/<name>`; created if missing (reused, so runs resume)."""
    path = Path(out) if out else DEFAULT_RUNS / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_rows(path: Path) -> Iterable[dict]:
    """The JSON rows of a JSONL file (none if it is missing); a line cut by a killed run is skipped,
    so that item is simply redone."""
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            continue


class ItemLog:
    """Append-only JSON lines keyed by an item id; `done(id)` tells what an earlier run finished.

    `also_read`: more files whose rows count as done (other processes' shards of a data-parallel
    run, see experiments/distributed.py); rows are only ever appended to `path`.
    """

    def __init__(self, path: Path, also_read: Iterable[Path] = ()):
        self.path = path
        self.rows: dict[str, dict] = {}
        for p in [*also_read, path]:
            for row in read_rows(p):
                self.rows[row["id"]] = row

    def done(self, item_id: str) -> bool:
        return item_id in self.rows

    def add(self, row: dict) -> None:
        assert "id" in row, "every item row needs an 'id'"
        self.rows[row["id"]] = row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_csv(path: Path, rows: Iterable[dict]) -> None:
    rows = list(rows)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def command() -> str:
    """The command line of this run, as a user would type it again."""
    argv = list(sys.argv)
    script = Path(argv[0])
    if os.environ.get("WORLD_SIZE", "1") != "1":  # one of several processes started by a launcher
        prefix = ["accelerate", "launch", "--num_processes", os.environ["WORLD_SIZE"]]
    else:
        prefix = []
    if script.name == "__main__.py":  # python -m PACKAGE
        argv[0:1] = ["python", "-m", script.parent.name]
    elif script.parent.name == "experiments":  # python -m experiments.MODULE
        argv[0:1] = ["python", "-m", f"experiments.{script.stem}"]
    else:
        argv[0] = script.name
    if prefix and argv[0] == "python":
        argv = prefix + argv[1:]  # `accelerate launch ... -m experiments ...`
    return shlex.join(argv)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(path: Path, title: str, *, model: str, dtype: str, sections: list[tuple[str, str]],
                 placement: str | None = None, processes: str | None = None) -> None:
    """A Markdown report: what was run, where, when, then the given (heading, body) sections.

    `placement`: the model's device or device map (`prompt_cache.models.describe_placement`);
    `processes`: the world size (`experiments.distributed.World.describe`).
    """
    head = [f"# {title}", "",
            f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- model: {model} ({dtype})", f"- machine: {machine()}"]
    if placement is not None:
        head.append(f"- placement: {placement}")
    if processes is not None:
        head.append(f"- processes: {processes}")
    head += [f"- command: `{command()}`", "", ""]
    body = [f"## {h}\n\n{b}" for h, b in sections]
    path.write_text("\n".join(head) + "\n".join(body))
