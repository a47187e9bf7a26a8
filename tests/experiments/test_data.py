"""Loaders on the real shared data (a few lines each) and workload builders: PML that parses and lays out."""

from __future__ import annotations

import pytest

from prompt_cache.tiny import ByteTokenizer
from experiments import data as D
from experiments import workloads as W
from pml.layout import compute_layout
from pml.parser import parse_prompt, parse_schema
from pml.prompt import bind_prompt


@pytest.fixture(scope="module")
def root():
    try:
        return D.data_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture
def tok():
    return ByteTokenizer()


def test_data_dir_flag_env_and_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path))
    assert D.data_dir() == tmp_path
    assert D.data_dir(tmp_path / ".") == tmp_path / "."
    with pytest.raises(FileNotFoundError, match="--data DIR or set PML_DATA"):
        D.data_dir(tmp_path / "absent")


def test_load_longbench(root):
    recs = D.load_longbench(root / "longbench" / "multi_news.jsonl", limit=2)
    assert len(recs) == 2 and recs[0].task == "multi_news" and recs[0].answers and recs[0].context
    trec = D.load_longbench(root / "longbench_mini" / "trec.jsonl", limit=1)[0]
    assert "Individual" in trec.all_classes


def test_load_musique_passages_rebuild_context(root):
    rec = D.load_musique(root / "multidoc" / "musique_train100_longbench_style.jsonl", limit=1)[0]
    assert len(rec.passages) == 20
    built = "".join(f"Passage {i}:\n{p.title}\n{p.text}\n" for i, p in enumerate(rec.passages, 1))
    assert built.rstrip() == rec.context.rstrip()


def test_load_leval_parallel_lists(root):
    doc = D.load_leval(root / "leval" / "coursera.jsonl", limit=1)[0]
    assert len(doc.instructions) == len(doc.outputs) > 1 and doc.evaluation == "exam"


def test_split_passages_round_trip():
    ctx = "Passage 1:\nA\ntext a\nPassage 2:\nB\ntext b\n"
    assert D.split_passages(ctx) == ("Passage 1:\nA\ntext a\n", "Passage 2:\nB\ntext b\n")
    assert D.split_passages("no passages here") is None


def _check(item, tok):
    schema = parse_schema(item.schema)
    layout = compute_layout(schema, tok)
    bound = bind_prompt(parse_prompt(item.prompt), layout, tok)
    assert len(bound.modules) == item.modules
    assert bound.suffix_ids
    return layout, bound


def test_document_item_template_split(root, tok):
    rec = D.load_longbench(root / "longbench" / "multi_news.jsonl", limit=1)[0]
    item = W.longbench_item(rec, "longbench/multi_news", tok, max_context_tokens=10**7)
    layout, bound = _check(item, tok)
    assert item.modules == 1 and not item.truncated and item.metric == "rouge_l"
    assert item.max_new_tokens == W.SUMMARY_CAP
    assert "You are given several news passages" in item.schema and "<user>Now, write" in item.prompt
    # chat tags: the assistant prefix ends the prompt
    assert bytes(i - 3 for i in bound.suffix_ids).decode().endswith("Assistant: ")


def test_fewshot_task_uses_plain_text(root, tok):
    rec = D.load_longbench(root / "longbench_mini" / "trec.jsonl", limit=1)[0]
    item = W.longbench_item(rec, "longbench_mini/trec", tok, 10**7)
    _check(item, tok)
    assert "<user>" not in item.prompt and item.first_line and item.all_classes


def test_middle_truncation_is_explicit(root, tok):
    rec = D.load_longbench(root / "longbench" / "multi_news.jsonl", limit=1)[0]
    item = W.longbench_item(rec, "longbench/multi_news", tok, max_context_tokens=300)
    _check(item, tok)
    # expected: first 150 and last 150 bytes of the context kept, and said so
    assert item.truncated and item.original_tokens == len(rec.context.encode())
    assert item.context_tokens == 300 and "first and last 150" in item.note
    assert rec.context.encode()[:100].decode(errors="ignore")[:50] in item.schema


def test_multi_passage_item_and_truncation(root, tok):
    rec = D.load_musique(root / "multidoc" / "musique_train100_longbench_style.jsonl", limit=1)[0]
    item = W.longbench_item(rec, "musique", tok, 10**7)
    layout, bound = _check(item, tok)
    assert item.modules == 20 and bound.modules == tuple(f"p{i}" for i in range(1, 21))
    lengths = [len(f"Passage {i}:\n{p.title}\n{p.text}\n".encode()) for i, p in enumerate(rec.passages, 1)]
    budget = sum(lengths[:3]) + 40
    cut = W.longbench_item(rec, "musique", tok, budget)
    _check(cut, tok)
    # expected: three passages whole, the fourth cut to 40 tokens, the rest dropped
    assert cut.truncated and cut.modules == 4 and cut.context_tokens <= budget
    assert cut.note.startswith("kept 3 of 20 passages whole, passage 4 cut to 40")


def test_longbench_hotpotqa_splits_on_passage_headers(root, tok):
    rec = D.load_longbench(root / "longbench_mini" / "hotpotqa.jsonl", limit=1)[0]
    item = W.longbench_item(rec, "longbench_mini/hotpotqa", tok, 10**7)
    _check(item, tok)
    assert item.modules == len(D.split_passages(rec.context)) > 1


def test_leval_items_share_one_schema(root, tok):
    doc = D.load_leval(root / "leval" / "coursera.jsonl", limit=1)[0]
    items = W.leval_items(doc, "leval/coursera", tok, 2000)
    assert len(items) == len(doc.instructions)
    assert len({i.schema for i in items}) == 1 and len({i.group for i in items}) == 1
    assert items[0].truncated and items[0].metric == "choice"
    for item in items[:2]:
        _check(item, tok)


def test_expand_tasks(root):
    got = W.expand_tasks("longbench/qmsum:8, longbench_mini/*:3,musique", root)
    names = [n for n, _ in got]
    assert got[0] == ("longbench/qmsum", 8) and ("longbench_mini/trec", 3) in got and got[-1] == ("musique", None)
    assert len([n for n in names if n.startswith("longbench_mini/")]) == 14
    with pytest.raises(ValueError, match="unknown task"):
        W.expand_tasks("squad", root)
    with pytest.raises(ValueError, match="whole number"):
        W.expand_tasks("musique:x", root)
    with pytest.raises(ValueError, match="no data file"):
        W.expand_tasks("longbench/nope", root)


def test_xml_unsafe_characters_are_dropped(tok):
    rec = D.Record("x1", "multi_news", "", "bad\x0bchar\x00s", ("s",))
    item = W.longbench_item(rec, "t", tok, 100)
    _check(item, tok)
    assert "badchars" in item.schema


def test_every_registered_experiment_imports_and_takes_arguments():
    # `pml bench` turns an experiment that fails to import into a "missing" message at run time;
    # catch that here instead.
    import argparse
    import importlib

    from experiments.cli import EXPERIMENTS

    for name in EXPERIMENTS:
        importlib.import_module(f"experiments.{name}").add_arguments(argparse.ArgumentParser())
