"""Data-parallel experiment runs under `accelerate launch`: this process's rank, its share of the items, shards, merge.

`accelerate launch --num_processes N -m experiments quality ...` starts N copies of the experiment.
Each takes a contiguous share of the items (as `accelerate.PartialState.split_between_processes`
does), writes the rows it finishes to its own JSON-lines shard `items.rank<r>-of<N>.jsonl` beside
the single-process `items.jsonl`, and waits for the others at a barrier; the main process then folds
every shard into `items.jsonl` and writes the usual summary, plots and report. A lone process (no
launcher) is rank 0 of 1 and writes `items.jsonl` directly, as before.

Resuming: every process counts an item as done if any file of the task (`items.jsonl` or any shard,
of this or an earlier world size) holds it, and appends only to its own shard, so a killed run
resumes per shard, under the same or another number of processes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

from attention_store.fileio import atomic_write
from experiments import outputs

log = logging.getLogger(__name__)

T = TypeVar("T")

# The barrier waits for the slowest shard; torch's default of 30 minutes is shorter than one shard of
# a 7B sweep can run ahead of another, so the process group is opened with this instead.
BARRIER_TIMEOUT = dt.timedelta(hours=24)
SHARD_RE = re.compile(r"\.rank(\d+)-of(\d+)$")


@dataclass(frozen=True)
class World:
    """Where this process sits among the launched ones (rank 0 of 1 without a launcher)."""

    rank: int = 0  # global process index, 0 = main (merges and reports)
    size: int = 1  # processes in the run
    local_rank: int = 0  # index on this machine: picks the GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if self.size == 1:
            return "1 (single process)"
        return f"{self.size} (data parallel: items split by rank, one JSON-lines shard per process, merged)"


def world(env: dict[str, str] | None = None) -> World:
    """This process's place from the variables `accelerate launch` (and torchrun) set."""
    env = os.environ if env is None else env
    try:
        w = World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {env.get('RANK')!r}/"
                         f"{env.get('WORLD_SIZE')!r}/{env.get('LOCAL_RANK')!r}") from None
    if w.size < 1 or not 0 <= w.rank < w.size:
        raise ValueError(f"rank {w.rank} is not within a world of {w.size} processes")
    return w


def start(w: World):
    """The accelerate state that joins this process to the others (None for a single process)."""
    if w.size == 1:
        return None
    import torch
    from accelerate import PartialState

    # Without CUDA, accelerate would not join the processes at all unless told to use the CPU
    # (gloo); its barrier would then return at once and the main process merge unfinished shards.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
    if state.num_processes != w.size:
        raise ValueError(f"WORLD_SIZE is {w.size} but accelerate joined {state.num_processes} process(es) "
                         f"({state.distributed_type}): start the run with `accelerate launch --num_processes N`")
    return state


def barrier(state) -> None:
    """Wait until every process got here (no-op for a single process)."""
    if state is not None:
        state.wait_for_everyone()


def placement(args, w: World, state) -> dict:
    """`load_model` keyword arguments from `--device`/`--device-map`, for this process.

    Under several processes each one gets its own device (accelerate's: `cuda:<local rank>` on a
    GPU machine, else cpu) unless `--device` says otherwise; a device map would have every process
    spread its model over every GPU, so it is refused there.
    """
    device, device_map = getattr(args, "device", None), getattr(args, "device_map", None)
    if w.size > 1 and device_map is not None:
        raise ValueError(f"--device-map {device_map} with {w.size} processes would put every process's model "
                         "on every GPU: use --device-map with one process, or several processes without it")
    if w.size > 1 and device is None and state is not None:
        # accelerate names the CPU "cpu:0" under gloo; the model's parameters say "cpu".
        device = "cpu" if state.device.type == "cpu" else str(state.device)
    return {"device": device, "device_map": device_map}


def share(items: Sequence[T], w: World) -> list[T]:
    """This process's contiguous share: sizes differ by at most one, the first ranks take the extra
    (the split of `PartialState.split_between_processes`)."""
    base, extra = divmod(len(items), w.size)
    start_ = w.rank * base + min(w.rank, extra)
    return list(items[start_:start_ + base + (w.rank < extra)])


def shard_path(path: Path, w: World) -> Path:
    """Where this process appends rows: `path` itself for one process, else `<stem>.rank<r>-of<N><suffix>`."""
    if w.size == 1:
        return path
    return path.with_name(f"{path.stem}.rank{w.rank}-of{w.size}{path.suffix}")


def shard_files(path: Path) -> list[Path]:
    """Every shard of `path` on disk (of any world size), in (size, rank) order; not `path` itself."""
    found = []
    for p in path.parent.glob(f"{path.stem}.rank*-of*{path.suffix}"):
        m = SHARD_RE.search(p.name[: -len(path.suffix)] if path.suffix else p.name)
        if m:
            found.append(((int(m.group(2)), int(m.group(1))), p))
    return [p for _, p in sorted(found)]


def merge_shards(path: Path) -> int:
    """Fold every shard of `path` into `path` (rows by id, `path`'s first, then shards by rank) and
    remove the shards; returns the number of rows written. The rewrite is atomic: a crash leaves
    either the shards or the merged file, and rows are keyed by id, so nothing is lost or doubled."""
    shards = shard_files(path)
    if not shards:
        return 0
    rows: dict[str, dict] = {}
    for p in [path, *shards]:
        for row in outputs.read_rows(p):
            rows.setdefault(row["id"], row)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows.values()))
    for p in shards:
        p.unlink()
    log.info("merged %d shard(s) into %s (%d rows)", len(shards), path, len(rows))
    return len(rows)
