"""Turn evaluation records into PML schemas and prompts with `pml.builder` (as users would with their data).

Three shapes, as in the paper's evaluation:
- document QA / summarization (LongBench, L-Eval): the long context is one module; LongBench's
  English prompt template is split at `{context}`: the text before it is schema root text, the text
  after it (with the question) is the prompt's user text.
- multi-document QA (MuSiQue, LongBench hotpotqa/2wikimqa/musique): each passage is its own module;
  the prompt selects every passage, in order, then asks the question.
- many questions over one document (L-Eval): one schema per document, every question a prompt.

Contexts longer than `max_context_tokens` are truncated explicitly and every item says so
(`truncated`, `original_tokens`, `note`): one-module contexts keep their first and last halves of
tokens (LongBench's convention); multi-passage contexts drop or cut passages from the end.

PML's whitespace rule drops whitespace around a text run, so the blank lines LongBench puts between
the context and the question become one newline at the end of the context module.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from experiments import data as D
from pml.builder import PromptBuilder, SchemaBuilder

log = logging.getLogger(__name__)

SUMMARY_CAP = 128  # max new tokens for summaries (LongBench uses 512; capped for CPU time)
MIN_CUT_TOKENS = 16  # a passage cut shorter than this is dropped instead

_QA_MULTI = ("Answer the question based on the given passages. Only give me the answer and do not output "
             "any other words.\n\nThe following are given passages.\n",
             "Answer the question based on the given passages. Only give me the answer and do not output any "
             "other words.\n\nQuestion: {input}\nAnswer:")


@dataclass(frozen=True)
class Template:
    """LongBench's prompt for one task, split at `{context}`."""

    before: str  # schema root text, before the context module
    after: str  # the prompt's text; `{input}` is the question
    max_new_tokens: int  # LongBench's per-task length (summaries capped at SUMMARY_CAP)
    metric: str  # a key of experiments.metrics.METRICS
    chat: bool = True  # LongBench applies no chat template to its few-shot tasks


# LongBench config/dataset2prompt.json and dataset2maxlen.json (English tasks).
TEMPLATES: dict[str, Template] = {
    "narrativeqa": Template(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
        "question asconcisely as you can, using a single phrase if possible. Do not provide any explanation."
        "\n\nStory: ",
        "Now, answer the question based on the story asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:", 128, "qa_f1"),
    "qasper": Template(
        "You are given a scientific article and a question. Answer the question as concisely as you can, "
        "using a single phrase or sentence if possible. If the question cannot be answered based on the "
        "information in the article, write \"unanswerable\". If the question is a yes/no question, answer "
        "\"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: ",
        "Answer the question based on the above article as concisely as you can, using a single phrase or "
        "sentence if possible. If the question cannot be answered based on the information in the article, "
        "write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:", 128, "qa_f1"),
    "multifieldqa_en": Template(
        "Read the following text and answer briefly.\n\n",
        "Now, answer the following question based on the above text, only give me the answer and do not "
        "output any other words.\n\nQuestion: {input}\nAnswer:", 64, "qa_f1"),
    "hotpotqa": Template(*_QA_MULTI, 32, "qa_f1"),
    "2wikimqa": Template(*_QA_MULTI, 32, "qa_f1"),
    "musique": Template(*_QA_MULTI, 32, "qa_f1"),
    "gov_report": Template(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n",
        "Now, write a one-page summary of the report.\n\nSummary:", SUMMARY_CAP, "rouge_l"),
    "qmsum": Template(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the "
        "query in one or more sentences.\n\nTranscript:\n",
        "Now, answer the query based on the above meeting transcript in one or more sentences.\n\n"
        "Query: {input}\nAnswer:", SUMMARY_CAP, "rouge_l"),
    "multi_news": Template(
        "You are given several news passages. Write a one-page summary of all news.\n\nNews:\n",
        "Now, write a one-page summary of all the news.\n\nSummary:", SUMMARY_CAP, "rouge_l"),
    "trec": Template(
        "Please determine the type of the question below. Here are some examples of questions.\n\n",
        "{input}", 64, "classification", chat=False),
    "triviaqa": Template(
        "Answer the question based on the given passage. Only give me the answer and do not output any "
        "other words. The following are some examples.\n\n", "{input}", 32, "qa_f1", chat=False),
    "samsum": Template(
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n",
        "{input}", 128, "rouge_l", chat=False),
    "passage_count": Template(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
        "carefully read these paragraphs and determine how many unique paragraphs there are after removing "
        "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n",
        "Please enter the final count of unique paragraphs after removing duplicates. The output format "
        "should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ", 32, "count"),
    "passage_retrieval_en": Template(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n",
        "The following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the "
        "abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\n"
        "The answer is: ", 32, "retrieval"),
}
MULTI_PASSAGE = ("hotpotqa", "2wikimqa", "musique")  # LongBench tasks whose context splits on "Passage N:"

# L-Eval's instruction framing (its baselines' system prompt), with the document as the module.
LEVAL_BEFORE = ("Now you are given a very long document. Please follow the instruction after this document. "
                "These instructions may include summarizing a document, answering questions based on the "
                "document, or writing a required paragraph.\n\nDocument is as follows. ")
LEVAL_EXAM = "Instruction: {input}\nAnswer with the option letter only, without any explanation.\nAnswer:"
LEVAL_OPEN = "Instruction: {input}\nAnswer:"
LEVAL_METRIC = {"exam": ("choice", 8), "f1": ("qa_f1", 128), "rouge": ("rouge_l", SUMMARY_CAP)}


@dataclass(frozen=True)
class Item:
    """One prompt to answer, with its schema and what it is scored against."""

    id: str
    task: str  # the task name the user selected, e.g. "longbench_mini/hotpotqa"
    schema: str  # PML schema XML
    prompt: str  # PML prompt XML
    answers: tuple[str, ...]
    max_new_tokens: int
    metric: str
    all_classes: tuple[str, ...] = ()
    group: str = ""  # schema name: items with the same group share one encoded schema
    modules: int = 1  # context modules in the schema
    context_tokens: int = 0  # context tokens after truncation
    original_tokens: int = 0  # context tokens before truncation
    truncated: bool = False
    note: str = ""  # what truncation did, in words
    first_line: bool = False  # LongBench scores only the first line for its few-shot tasks


# --------------------------------------------------------------------------- truncation

_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def xml_safe(text: str) -> str:
    """Drop characters XML 1.0 cannot hold (control characters), which some records contain."""
    return _XML_BAD.sub("", text)


@dataclass(frozen=True)
class Cut:
    texts: tuple[str, ...]
    original_tokens: int
    kept_tokens: int
    truncated: bool
    note: str


def truncate_middle(text: str, tokenizer, max_tokens: int) -> Cut:
    """Keep the first and last `max_tokens // 2` tokens (LongBench's convention) if `text` is longer."""
    ids = tokenizer.encode(text)
    if len(ids) <= max_tokens:
        return Cut((text,), len(ids), len(ids), False, "")
    half = max_tokens // 2
    kept = tokenizer.decode(ids[:half]) + tokenizer.decode(ids[len(ids) - half:])
    n = len(tokenizer.encode(kept))
    return Cut((kept,), len(ids), n, True, f"kept first and last {half} of {len(ids)} tokens")


def truncate_passages(passages: tuple[str, ...], tokenizer, max_tokens: int) -> Cut:
    """Keep passages in order while they fit; cut the first that does not, drop the rest."""
    lengths = [len(tokenizer.encode(p)) for p in passages]
    total = sum(lengths)
    if total <= max_tokens:
        return Cut(passages, total, total, False, "")
    kept: list[str] = []
    used = 0
    cut_note = ""
    for p, n in zip(passages, lengths):
        if used + n <= max_tokens:
            kept.append(p)
            used += n
            continue
        room = max_tokens - used
        if room >= MIN_CUT_TOKENS:
            ids = tokenizer.encode(p)
            kept.append(tokenizer.decode(ids[:room]))
            used += len(tokenizer.encode(kept[-1]))
            cut_note = f", passage {len(kept)} cut to {room} of {n} tokens"
        break
    if not kept:
        raise ValueError("max_context_tokens is too small to keep any passage")
    whole = len(kept) - (1 if cut_note else 0)
    note = f"kept {whole} of {len(passages)} passages whole{cut_note}; {total} -> {used} tokens"
    return Cut(tuple(kept), total, used, True, note)


# --------------------------------------------------------------------------- builders


def schema_name(item_id: str) -> str:
    return "s_" + re.sub(r"[^A-Za-z0-9_.-]", "_", item_id)


def _module_text(text: str) -> str:
    # One newline separates the context from what follows (PML drops surrounding whitespace).
    return xml_safe(text).strip() + "\n"


def build_schema(name: str, before: str, contexts: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """Schema XML with root text `before` and one module per context; returns (xml, module names)."""
    b = SchemaBuilder(name)
    b.text(xml_safe(before))
    names = tuple(f"p{i}" for i in range(1, len(contexts) + 1)) if len(contexts) > 1 else ("context",)
    for module, text in zip(names, contexts):
        b.module(module, text=_module_text(text))
    return b.to_xml(), names


def build_prompt(name: str, modules: tuple[str, ...], text: str, chat: bool) -> str:
    """Prompt XML selecting `modules` in order, then `text` (as a `<user>` turn when `chat`)."""
    p = PromptBuilder(name)
    for m in modules:
        p.use(m)
    text = xml_safe(text).strip()
    if chat:
        p.user(text)
    else:
        p.text(text)
    return p.to_xml()


def longbench_item(rec: D.Record, task: str, tokenizer, max_context_tokens: int,
                   split: bool | None = None) -> Item:
    """A LongBench record as an Item; `split` (default: for multi-passage tasks) makes one module per passage."""
    t = TEMPLATES.get(rec.task)
    if t is None:
        raise ValueError(f"no LongBench template for task {rec.task!r} (known: {', '.join(sorted(TEMPLATES))})")
    if rec.passages is not None:
        pieces = tuple(f"Passage {i}:\n{p.title}\n{p.text}\n" for i, p in enumerate(rec.passages, 1))
    elif split if split is not None else rec.task in MULTI_PASSAGE:
        pieces = D.split_passages(rec.context)
    else:
        pieces = None
    cut = (truncate_passages(pieces, tokenizer, max_context_tokens) if pieces
           else truncate_middle(rec.context, tokenizer, max_context_tokens))
    name = schema_name(rec.id)
    schema, modules = build_schema(name, t.before, cut.texts)
    prompt = build_prompt(name, modules, t.after.format(input=rec.input), t.chat)
    return Item(id=rec.id, task=task, schema=schema, prompt=prompt, answers=rec.answers,
                max_new_tokens=t.max_new_tokens, metric=t.metric, all_classes=rec.all_classes, group=name,
                modules=len(modules), context_tokens=cut.kept_tokens, original_tokens=cut.original_tokens,
                truncated=cut.truncated, note=cut.note, first_line=not t.chat)


def leval_items(doc: D.LevalDoc, task: str, tokenizer, max_context_tokens: int) -> list[Item]:
    """All questions of one L-Eval document: one schema, one prompt per question."""
    metric, max_new = LEVAL_METRIC.get(doc.evaluation, ("rouge_l", SUMMARY_CAP))
    after = LEVAL_EXAM if doc.evaluation == "exam" else LEVAL_OPEN
    cut = truncate_middle(doc.document, tokenizer, max_context_tokens)
    name = schema_name(doc.id)
    schema, modules = build_schema(name, LEVAL_BEFORE, cut.texts)
    items = []
    for j, (q, a) in enumerate(zip(doc.instructions, doc.outputs)):
        items.append(Item(id=f"{doc.id}-q{j}", task=task, schema=schema,
                          prompt=build_prompt(name, modules, after.format(input=q), True), answers=(a,),
                          max_new_tokens=max_new, metric=metric, group=name, modules=1,
                          context_tokens=cut.kept_tokens, original_tokens=cut.original_tokens,
                          truncated=cut.truncated, note=cut.note))
    return items


# --------------------------------------------------------------------------- task names


def _files(root: Path, folder: str) -> list[str]:
    return sorted(f"{folder}/{p.stem}" for p in (root / folder).glob("*.jsonl"))


def expand_tasks(spec: str, root: Path) -> list[tuple[str, int | None]]:
    """`a,b:8,longbench_mini/*:3` -> [(task, limit)]; `*` globs a data folder, `:N` sets that task's item
    limit (None: the caller's default). Unknown names are errors."""
    out: dict[str, int | None] = {}
    for part in (s.strip() for s in spec.split(",")):
        if not part:
            continue
        name, _, n = part.partition(":")
        if n and not n.isdigit():
            raise ValueError(f"task {part!r}: the limit after ':' must be a whole number")
        limit = int(n) if n else None
        if name.endswith("/*"):
            found = _files(root, name[:-2])
            if not found:
                raise ValueError(f"task pattern {name!r} matches no files under {root}")
            out.update((f, limit) for f in found)
        else:
            task_path(name, root)  # validates
            out[name] = limit
    return list(out.items())


def task_path(task: str, root: Path) -> Path:
    if task == "musique":
        path = root / "multidoc" / "musique_train100_longbench_style.jsonl"
    elif task.count("/") == 1 and task.split("/")[0] in ("longbench", "longbench_mini", "leval"):
        path = root / f"{task}.jsonl"
    else:
        raise ValueError(f"unknown task {task!r}: use longbench/<name>, longbench_mini/<name>, leval/<name> "
                         "or musique (a folder/* pattern selects every file of a folder)")
    if not path.is_file():
        raise ValueError(f"task {task!r}: no data file {path}")
    return path


def load_items(task: str, root: Path, tokenizer, max_context_tokens: int, limit: int | None = None) -> list[Item]:
    """The first `limit` items of `task` (L-Eval: questions of whole documents, `limit` questions in all)."""
    path = task_path(task, root)
    folder = task.split("/")[0]
    if folder == "leval":
        items: list[Item] = []
        for doc in D.load_leval(path):
            items += leval_items(doc, task, tokenizer, max_context_tokens)
            if limit is not None and len(items) >= limit:
                return items[:limit]
        return items
    records = D.load_musique(path, limit) if task == "musique" else D.load_longbench(path, limit)
    return [longbench_item(r, task, tokenizer, max_context_tokens) for r in records]


def metric_name(task: str, root: Path) -> str:
    """The metric of a task without building its items."""
    if task == "musique":
        return TEMPLATES["musique"].metric
    if task.startswith("leval/"):
        doc = D.load_leval(task_path(task, root), 1)
        return LEVAL_METRIC.get(doc[0].evaluation, ("rouge_l", 0))[0] if doc else "rouge_l"
    return TEMPLATES[task.split("/", 1)[1]].metric


# --------------------------------------------------------------------------- synthetic document workloads


def schema_xml(name: str, texts: list[str]) -> str:
    """A schema with one module per text (`doc0`, `doc1`, ...)."""
    b = SchemaBuilder(name)
    for i, text in enumerate(texts):
        b.module(f"doc{i}", text=text)
    return b.to_xml()


def prompt_xml(name: str, modules: int, question: str) -> str:
    """A prompt that selects every module and asks `question` as user text."""
    p = PromptBuilder(name)
    for i in range(modules):
        p.use(f"doc{i}")
    return p.user(question).to_xml()
