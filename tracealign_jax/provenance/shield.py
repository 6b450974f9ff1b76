"""TraceShield: refuse a completion when one of its maximal corpus spans has BCI > tau, and say why.

A batch of completions is checked with one compiled maximal-span call over all of them, one batched
occurrence-sampling call and one batched ``locate`` for the offending spans' sources. Each verdict
lists the offending spans (token range, text, BCI, conflict, rarity, support) and their top
training-time sources (documents ranked by policy risk, then id) with a snippet around the match.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tracealign_jax.atomic_io import atomic_write_jsonl
from tracealign_jax.provenance.bci import BCIScorer, ScoredSpan
from tracealign_jax.provenance.calibrate import Threshold


@dataclasses.dataclass
class Source:
    """One training-time occurrence of a span: document, token offset in it, its labels, a snippet."""

    doc_id: int
    offset: int
    risk: float
    metadata: dict
    snippet: str


@dataclasses.dataclass
class OffendingSpan:
    """A span with BCI > tau: ``tokens[start:end]`` of the completion (token offsets, end exclusive)."""

    start: int
    end: int
    tokens: list[int]
    text: str
    count: int
    rarity: float
    conflict: float
    bci: float
    sources: list[Source]


@dataclasses.dataclass
class ShieldVerdict:
    """Per completion: refuse iff max span BCI > tau; offending spans sorted by BCI, largest first.

    id: the input record's ``id`` (its line number when it has none); passthrough: the record's other
    fields, written beside the verdict's own (a field named like one of the verdict's is dropped)."""

    refuse: bool
    max_bci: float
    tau: float
    num_tokens: int
    num_spans: int
    spans: list[OffendingSpan]
    text: str = ""
    id: str = ""
    passthrough: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        own = dataclasses.asdict(self)
        extra = own.pop("passthrough")
        return {**{k: v for k, v in extra.items() if k not in own}, **own}


class TraceShield:
    """Batched refusal + attribution against one index with a threshold calibrated on that index."""

    def __init__(self, index: Any, scorer: BCIScorer, threshold: Threshold, *, tokenizer: Any = None,
                 top_sources: int = 3, snippet_tokens: int = 12, check_index: bool = True):
        if check_index:
            threshold.check_index(index)
        self.index, self.scorer, self.threshold = index, scorer, threshold
        self.tokenizer = tokenizer
        self.top_sources, self.snippet_tokens = top_sources, snippet_tokens

    # ---- text <-> tokens ------------------------------------------------------------------------

    def _tok(self) -> Any:
        if self.tokenizer is None:
            tok_dir = getattr(self.index, "tokenizer_dir", None)
            if not tok_dir:
                raise ValueError("text completions need a tokenizer: this index has none (pass token ids)")
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        return self.tokenizer

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok().encode(text, add_special_tokens=False), dtype=np.int64)

    def decode(self, tokens: Sequence[int]) -> str:
        if self.tokenizer is None and not getattr(self.index, "tokenizer_dir", None):
            return " ".join(str(int(t)) for t in tokens)
        return self._tok().decode([int(t) for t in tokens])

    # ---- checking ---------------------------------------------------------------------------------

    def check_batch(self, completions: Sequence[str] | Sequence[Sequence[int]]) -> list[ShieldVerdict]:
        """Verdicts for a batch of completions (all strings, or all token-id sequences)."""
        texts = [c if isinstance(c, str) else "" for c in completions]
        token_lists = [self.encode(c) if isinstance(c, str) else np.asarray(c, np.int64) for c in completions]
        return self._verdicts(token_lists, self.scorer.scan_batch(token_lists), texts)

    def check_sequential(self, token_lists: Sequence[Sequence[int]]) -> list[ShieldVerdict]:
        """The un-batched reference path (benchmarks): one index call per completion and per span."""
        scanned = []
        for tokens in token_lists:
            arr = np.asarray(tokens, np.int64)
            row = []
            for s in self.index.maximal_spans(arr, min_len=self.scorer.cfg.min_span):
                best, start, end = self._score_one(arr, s.start, s.end), s.start, s.end
                if self.scorer.needs_cores(best.bci, best.count):
                    for a, b in self.scorer.cores(s.start, s.end):
                        sc = self._score_one(arr, a, b)
                        if sc.bci > best.bci:
                            best, start, end = sc, a, b
                row.append(ScoredSpan(start, end, best.count, best.rarity, best.density, best.conflict, best.bci,
                                      best.p_violating))
            scanned.append(row)
        return self._verdicts([np.asarray(t, np.int64) for t in token_lists], scanned, [""] * len(token_lists))

    def _score_one(self, arr: np.ndarray, a: int, b: int) -> Any:
        doc_ids, total = self.index.occurrence_docs(arr[a:b], self.scorer.cfg.sample_size)
        return self.scorer.score_counted(arr[a:b], int(total), self.index.doc_unsafe(doc_ids))

    def _verdicts(self, token_lists: list[np.ndarray], scanned: list[list[ScoredSpan]],
                  texts: list[str]) -> list[ShieldVerdict]:
        tau = self.threshold.tau
        offending = [(i, s) for i, row in enumerate(scanned) for s in row if s.bci > tau]
        span_toks = [token_lists[i][s.start:s.end] for i, s in offending]
        sources = self._sources(span_toks) if offending and self.top_sources else [[] for _ in offending]
        per_row: list[list[OffendingSpan]] = [[] for _ in token_lists]
        for (i, s), toks, src in zip(offending, span_toks, sources):
            per_row[i].append(OffendingSpan(s.start, s.end, toks.tolist(), self.decode(toks), s.count, s.rarity,
                                            s.conflict, s.bci, src))
        out = []
        for i, row in enumerate(scanned):
            spans = sorted(per_row[i], key=lambda o: -o.bci)
            max_bci = max((s.bci for s in row), default=0.0)
            out.append(ShieldVerdict(bool(spans), float(max_bci), tau, int(token_lists[i].size), len(row), spans,
                                     texts[i]))
        return out

    def _sources(self, span_toks: list[np.ndarray]) -> list[list[Source]]:
        """Top sources of each span: one batched locate, one risk lookup, one metadata lookup."""
        located = self.index.locate_batch(span_toks, 4 * self.top_sources)
        all_docs = np.array([d for occ in located for d, _ in occ], np.int64)
        all_risk = self.index.doc_unsafe(all_docs) if all_docs.size else np.zeros(0)
        picks, at = [], 0
        for occ in located:  # riskiest documents first, then by id
            docs, risks = all_docs[at:at + len(occ)], all_risk[at:at + len(occ)]
            at += len(occ)
            picks.append([(occ[j][0], occ[j][1], float(risks[j])) for j in np.lexsort((docs, -risks))[: self.top_sources]])
        chosen = [d for p in picks for d, _, _ in p]
        metas = iter(self.index.doc_metadata(chosen) if chosen else [])
        out = []
        for toks, pick in zip(span_toks, picks):
            row = []
            for doc_id, offset, risk in pick:
                doc = self.index.doc_tokens(doc_id)
                n = len(toks)
                a, b = max(0, offset - self.snippet_tokens), min(len(doc), offset + n + self.snippet_tokens)
                snippet = f"{self.decode(doc[a:offset])} [[{self.decode(doc[offset:offset + n])}]] " \
                          f"{self.decode(doc[offset + n:b])}".strip()
                row.append(Source(int(doc_id), int(offset), risk, next(metas), snippet))
            out.append(row)
        return out


def write_jsonl(verdicts: Sequence[ShieldVerdict], path: str | Path) -> None:
    """One JSON object per completion, in input order (for pipelines)."""
    atomic_write_jsonl(path, [v.to_json() for v in verdicts])


def render_report(verdicts: Sequence[ShieldVerdict], title: str = "TraceShield report") -> str:
    """A Markdown report for people: summary, then each refused completion with spans and sources."""
    refused = [i for i, v in enumerate(verdicts) if v.refuse]
    tau = verdicts[0].tau if verdicts else float("nan")
    lines = [f"# {title}", "", f"- completions checked: {len(verdicts)}",
             f"- refused: {len(refused)} (BCI > tau = {tau:.3f} nats)", ""]
    for i in refused:
        v = verdicts[i]
        name = f"{v.id} (#{i})" if v.id else str(i)
        lines += [f"## Completion {name}: REFUSED (max BCI {v.max_bci:.2f} nats, {v.num_tokens} tokens)", ""]
        if v.text:
            lines += ["> " + v.text.replace("\n", " "), ""]
        lines += ["| tokens | BCI | conflict | rarity (nats) | support | span |", "|---|---|---|---|---|---|"]
        for s in v.spans:
            lines.append(f"| {s.start}-{s.end} | {s.bci:.2f} | {s.conflict:.3f} | {s.rarity:.2f} | {s.count} | "
                         f"`{s.text.replace('|', '/')}` |")
        lines.append("")
        for s in v.spans:
            for src in s.sources:
                meta = {k: src.metadata[k] for k in ("category", "source", "title") if k in src.metadata}
                lines.append(f"- span {s.start}-{s.end} <- doc {src.doc_id} @ token {src.offset} "
                             f"(risk {src.risk:.2f}{', ' + json.dumps(meta) if meta else ''}): {src.snippet}")
        lines.append("")
    passed = len(verdicts) - len(refused)
    lines.append(f"{passed} completion(s) passed.")
    return "\n".join(lines) + "\n"
