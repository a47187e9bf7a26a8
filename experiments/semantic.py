"""Semantic cache thresholds: false hits on questions that must not match, hits on surface rewrites.

Data: SQuAD v2 dev (the CS224N half), the first `--paragraphs` paragraphs in file order. Every
decision goes through `SemanticCache` itself (all-MiniLM-L6-v2, exact faiss index), at each
threshold in `--thresholds`:

- false hits, pairs: for every unordered pair of different questions about the same paragraph
  (questions equal after lower-casing and dropping punctuation are skipped, and counted), the first
  is stored in a partition of its own and the second looked up there; any hit is a false hit.
  Reported over all pairs and over pairs of two answerable questions (SQuAD v2's unanswerable
  questions were written as small edits of answerable ones: the hardest negatives).
- false hits, leave one out: every question looked up in a partition holding all the *other*
  questions of its paragraph (the realistic case: many earlier questions about one document).
- hits on rewrites: every question stored in its paragraph's partition, then each rewrite of it
  looked up; a hit on the question's own answer is a hit, on another question's answer a wrong hit.
  Rewrites are deterministic and labelled (REWRITES below).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections import Counter

from experiments import cli, outputs
from experiments.data import data_dir

THRESHOLDS = "0.80,0.85,0.88,0.90,0.92,0.94,0.95,0.96,0.97,0.98"


def _strip_punct(q: str) -> str:
    return re.sub(r"[^\w\s]", "", q).strip()


def _lower_first(q: str) -> str:
    return q[:1].lower() + q[1:]


# label -> rewrite; each keeps the question's meaning and changes only its surface.
REWRITES = {
    "lowercase": lambda q: q.lower(),
    "uppercase": lambda q: q.upper(),
    "no-punctuation": _strip_punct,
    "please-prefix": lambda q: "Please tell me: " + q,
    "could-you": lambda q: "Could you tell me " + _lower_first(q.rstrip("?")) + "?",
    "thanks-suffix": lambda q: q + " Thanks!",
    "combined": lambda q: "please, " + _strip_punct(q).lower() + " thank you",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--paragraphs", type=cli.positive, default=150, help="SQuAD paragraphs used (default: %(default)s)")
    parser.add_argument("--thresholds", type=cli.listed(cli.similarity), default=THRESHOLDS, help="comma-separated cosine thresholds")
    parser.add_argument("--index", default="auto", choices=["auto", "faiss", "flat"], help="vector index (default: %(default)s)")
    cli.add_threads_argument(parser)
    cli.add_run_arguments(parser, "semantic")


def load_paragraphs(path, limit: int) -> list[list[dict]]:
    """Per paragraph, its questions as {"id", "question", "answerable"} (file order)."""
    data = json.loads(path.read_text())["data"]
    paras = [[{"id": qa["id"], "question": qa["question"].strip(), "answerable": not qa.get("is_impossible", False)}
              for qa in p["qas"]] for art in data for p in art["paragraphs"]]
    return [p for p in paras if len(p) >= 2][:limit]


class MemoEmbedder:
    """Embeds each distinct text once (the same texts are looked up at every threshold)."""

    def __init__(self, inner):
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.memo: dict = {}

    def prime(self, texts) -> None:
        todo = sorted({t for t in texts if t not in self.memo})
        for t, v in zip(todo, self.inner.embed(todo) if todo else []):
            self.memo[t] = v

    def load(self, path) -> None:
        """Vectors saved by an earlier run with the same embedder (embedding is the slow part)."""
        import numpy as np

        if path.is_file():
            saved = np.load(path, allow_pickle=False)
            if str(saved["embedder"]) == self.name:
                self.memo.update(zip(saved["texts"].tolist(), saved["vectors"]))

    def save(self, path) -> None:
        import numpy as np

        texts = sorted(self.memo)
        np.savez(path, embedder=self.name, texts=np.array(texts), vectors=np.stack([self.memo[t] for t in texts]))

    def embed(self, texts):
        import numpy as np

        self.prime(texts)
        return np.stack([self.memo[t] for t in texts])


def _norm(q: str) -> str:
    return _strip_punct(q).lower()


def evaluate(paras: list[list[dict]], embedder, threshold: float, index_kind: str) -> dict:
    from prompt_cache.semantic.cache import SemanticCache, SemanticCacheConfig, context_key
    from prompt_cache.semantic.index import new_index

    def cache():
        return SemanticCache(embedder, SemanticCacheConfig(threshold=threshold, ttl_s=None),
                             index_factory=lambda d: new_index(d, index_kind))

    pairs = Counter()
    sc = cache()
    for pi, para in enumerate(paras):
        ctx = context_key(paragraph=pi)
        for a, b in itertools.combinations(para, 2):
            if _norm(a["question"]) == _norm(b["question"]):
                pairs["skipped_identical"] += 1
                continue
            tenant = f"{a['id']}|{b['id']}"  # a partition per pair: the pair decides alone
            sc.store(a["question"], a["id"], ctx, tenant)
            hit = sc.lookup(b["question"], ctx, tenant) is not None
            both = a["answerable"] and b["answerable"]
            pairs["n"] += 1
            pairs["false"] += hit
            pairs["n_answerable"] += both
            pairs["false_answerable"] += hit and both
    loo = Counter()
    rewrites = {label: Counter() for label in REWRITES}
    for pi, para in enumerate(paras):
        ctx = context_key(paragraph=pi)
        sc = cache()
        for q in para:  # leave one out: partition "without <id>" holds every other question
            for other in para:
                if other is not q:
                    sc.store(other["question"], other["id"], ctx, tenant=q["id"])
            loo["n"] += 1
            hit = sc.lookup(q["question"], ctx, tenant=q["id"])
            loo["false"] += hit is not None and _norm(hit.question) != _norm(q["question"])
        for q in para:
            sc.store(q["question"], q["id"], ctx, tenant="all")
        for q in para:
            for label, rewrite in REWRITES.items():
                hit = sc.lookup(rewrite(q["question"]), ctx, tenant="all")
                c = rewrites[label]
                c["n"] += 1
                if hit is not None and (hit.answer == q["id"] or _norm(hit.question) == _norm(q["question"])):
                    c["hit"] += 1
                elif hit is not None:
                    c["wrong"] += 1
    row = {"threshold": threshold,
           "pairs": pairs["n"], "false_hit_rate_pairs": pairs["false"] / max(pairs["n"], 1),
           "answerable_pairs": pairs["n_answerable"],
           "false_hit_rate_answerable_pairs": pairs["false_answerable"] / max(pairs["n_answerable"], 1),
           "loo_lookups": loo["n"], "false_hit_rate_loo": loo["false"] / max(loo["n"], 1),
           "skipped_identical_pairs": pairs["skipped_identical"]}
    total = Counter()
    for label, c in rewrites.items():
        row[f"hit_{label}"] = c["hit"] / max(c["n"], 1)
        total.update(c)
    row["rewrites"] = total["n"]
    row["hit_rate_rewrites"] = total["hit"] / max(total["n"], 1)
    row["wrong_hit_rate_rewrites"] = total["wrong"] / max(total["n"], 1)
    return row


def closest_negatives(paras: list[list[dict]], embedder, n: int = 8) -> list[dict]:
    """The `n` most similar pairs of different questions about one paragraph (what false hits look like)."""
    from prompt_cache.semantic.cache import normalize_question

    pairs = []
    for para in paras:
        for a, b in itertools.combinations(para, 2):
            if _norm(a["question"]) != _norm(b["question"]):
                va, vb = embedder.embed([normalize_question(a["question"]), normalize_question(b["question"])])
                pairs.append({"similarity": round(float(va @ vb), 3), "answerable": f"{a['answerable']}/{b['answerable']}",
                              "first": a["question"], "second": b["question"]})
    return sorted(pairs, key=lambda r: -r["similarity"])[:n]


def run(args: argparse.Namespace) -> int:
    from prompt_cache.semantic.cache import normalize_question
    from prompt_cache.semantic.embedder import MiniLMEmbedder

    cli.apply_threads(args)

    path = data_dir(args.data) / "squad_v2" / "dev-v2.0.cs224n.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    thresholds = list(args.thresholds)
    out = outputs.run_dir("semantic", args.out)
    paras = load_paragraphs(path, args.paragraphs)
    embedder = MemoEmbedder(MiniLMEmbedder())
    texts = [q["question"] for p in paras for q in p]
    embedder.load(out / "embeddings.npz")
    embedder.prime([normalize_question(t) for q in texts for t in [q, *(r(q) for r in REWRITES.values())]])
    embedder.save(out / "embeddings.npz")
    print(f"{len(paras)} paragraphs, {len(texts)} questions, {len(embedder.memo)} distinct texts embedded",
          file=sys.stderr)
    rows = [evaluate(paras, embedder, t, args.index) for t in thresholds]
    examples = closest_negatives(paras, embedder)
    outputs.write_csv(out / "summary.csv", rows)
    main_cols = ["threshold", "pairs", "false_hit_rate_pairs", "answerable_pairs", "false_hit_rate_answerable_pairs",
                 "loo_lookups", "false_hit_rate_loo", "rewrites", "hit_rate_rewrites", "wrong_hit_rate_rewrites"]
    per_rewrite = ["threshold", *(f"hit_{label}" for label in REWRITES)]
    setup = (f"SQuAD v2 dev (CS224N half), first {len(paras)} paragraphs with 2+ questions: {len(texts)} "
             f"questions; embedder all-MiniLM-L6-v2 (mean pooling, L2 norm); index {args.index}. "
             f"{rows[0]['skipped_identical_pairs']} pairs equal up to case and punctuation were skipped. "
             f"Rewrites: " + "; ".join(f"{k}: {REWRITES[k]('What is the Rhine?')!r}" for k in REWRITES) + ".\n")
    outputs.write_report(out / "report.md", "Semantic cache thresholds", model="all-MiniLM-L6-v2", dtype="float32",
                         sections=[("Setup", setup), ("False hits and hits", outputs.markdown_table(rows, main_cols)),
                                   ("Hit rate per rewrite", outputs.markdown_table(rows, per_rewrite)),
                                   ("The most similar different-question pairs", outputs.markdown_table(examples))])
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    from experiments.cli import main

    raise SystemExit(main(["semantic", *sys.argv[1:]]))
