"""Shared by the probes: the speed benchmark's 4,000-token module and question over smollm2-135m, one thread."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout: `python scripts/probes/X.py`


def speed_prompt(context: int = 4000, threads: int = 1):
    """(PromptCache with the module encoded in a memory tier, schema XML, prompt XML), as `pml bench speed` builds them."""
    import torch

    from attention_store.store import AttentionStore
    from attention_store.tiers import MemoryTier
    from experiments.common import document_pool, exact_text
    from experiments.data import data_dir
    from experiments.speed import QUESTION
    from experiments.workloads import prompt_xml, schema_xml
    from prompt_cache.engine import PromptCache
    from prompt_cache.models import load_model

    torch.set_num_threads(threads)
    lm = load_model("smollm2-135m")
    text, _ = exact_text(lm.tokenizer, document_pool(data_dir(None), lm.tokenizer, context), context)
    pc = PromptCache(lm, AttentionStore(MemoryTier(8 << 30), None))
    schema = schema_xml("speed", [text])
    pc.add_schema(schema)
    pc.encode("speed")
    return pc, schema, prompt_xml("speed", 1, QUESTION)


def speed_run(run_dir: str, model: str) -> Path:
    """The speed benchmark's run folder (schema, prompt, store), or exit saying how to make it."""
    run = Path(run_dir)
    if not (run / "speed.pml").is_file():
        raise SystemExit(f"{run}/speed.pml not found: run python -m experiments.speed --model {model} first")
    return run


def speed_store_prompt(run: Path, model: str, threads: int, promote_disk_hits: bool = True):
    """(PromptCache over the speed benchmark's disk store in `run`, its prompt XML), as a fresh
    `pml run` process would answer it: model loaded, store opened, schema added."""
    import torch

    from attention_store.store import open_store
    from prompt_cache.engine import PromptCache
    from prompt_cache.models import load_model

    torch.set_num_threads(threads)
    lm = load_model(model, torch.float32)
    pc = PromptCache(lm, open_store(run / "store-scratch", lm, promote_disk_hits=promote_disk_hits))
    pc.add_schema((run / "speed.pml").read_text())
    return pc, (run / "speed_prompt.pml").read_text()


def median_ms(fn, repeats: int = 10) -> float:
    """Median milliseconds of `fn()` (after an untimed call)."""
    import statistics

    from experiments.speed_extras import time_ms

    return time_ms(fn, repeats, pick=statistics.median)
