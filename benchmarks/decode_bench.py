"""Prov-Decode vs the same beam search without the veto vs transformers ``generate`` + a host veto.

One run, one tiny random Llama (vocab 32k by default), the same prompts, and ONE provenance: a
synthetic corpus indexed with ``index.build_index_from_tokens``; the veto table is built from that
index (``provenance.veto_build.build_veto_table``: the windows of n_min..n_max tokens of violating
documents whose BCI exceeds tau) and the host processor queries the same index. Rows:

  1. ours, beam search, veto off               (one jitted while_loop)
  2. ours, Prov-Decode, hard veto              (table lookup inside the loop, no host call)
  3. transformers generate(num_beams=K), no processor (reference point)
  4. transformers generate(num_beams=K) + ``IndexVeto``, a Python LogitsProcessor that queries the
     TraceIndex on the host at every step, the way the TraceAlign reference implementation works.
     Per step, per beam, per suffix length k = min_prefix..C of the beam's running sequence:
       a. ``index.next_token_counts(suffix)``: the tokens the corpus continues the suffix with (the
          reference asks the index once per VOCABULARY ITEM; any item with count 0 has BCI 0, so
          this one call answers those V calls: a cheaper-than-reference version);
       b. per continuation t: ``index.locate(suffix + t)``, ``doc_unsafe`` of those documents, and
          ``doc_tokens`` of the violating ones (risk >= 0.5) give the windows of n_min..n_max tokens
          that start with suffix + t, the spans the veto table was built from;
       c. ``BCIScorer.score_arrays`` of those windows and of the prefixes suffix + t (one batched
          call per beam and step); as ``veto_build`` defines an entry: a window s with BCI(s) > tau
          gives t the penalty conflict(suffix + t) x BCI(s) when that conflict share exceeds
          ``veto_min_conflict`` (``veto_weighting = conflict``, the default; BCI(s) with ``none``);
          penalty(t) = the max over windows, top ``max_entries`` tokens per suffix, max over suffix
          lengths; tokens with penalty > tau are set to -inf (hard veto).
     That is the veto table's definition, computed live; the bench checks both sides veto the same
     tokens with the same penalties on every running context of the unvetoed search (``agreement``).
  5. the same, the way the TraceAlign reference implementation asks the index: one Python
     ``index.count(suffix + [t])`` call per VOCABULARY ITEM t per beam per step (suffix = the last
     ``min_prefix`` tokens; a longer suffix can only continue with those t), then step 4's look-ups
     for the items that occur. Same veto sets (checked on a sample of contexts: ``agreement``); it
     takes minutes, so it runs ``--ref-repeats`` times (default 1, after the other rows' warm-up);
     ``--ref-repeats 0`` skips it.

All four run exactly ``max_new_tokens`` steps (EOS can never end a beam: ours gets an EOS id outside
the vocabulary, HF gets ``min_new_tokens = max_new_tokens``), so times compare per step. Times are
medians over repeats of one batch after compilation / warm-up (first-call time reported apart),
wall clock and process CPU time (all threads) side by side; our two rows are interleaved so load
drift hits both alike.

    .venv/bin/python benchmarks/decode_bench.py [--vocab 32000 --hidden 64 --batch 8 --beams 4 --max-new 32]
    .venv/bin/python benchmarks/decode_bench.py --hidden 256    # a less tiny model
    .venv/bin/python benchmarks/decode_bench.py --torch-threads 1   # stable HF timings on a shared machine
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds over all threads) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def synthetic_corpus(rng: np.random.Generator, vocab: int, planted: list[list[int]], *, n_benign: int,
                     n_unsafe: int, doc_len: int, phrase_len: int) -> tuple[list[np.ndarray], list[dict]]:
    """Benign documents of zipf-distributed tokens; violating ones are benign filler with one planted
    phrase: a random one (uniform tokens, so mostly rare: high BCI) or one of ``planted``."""
    rank = rng.permutation(np.arange(3, vocab))
    p = 1.0 / np.arange(1, rank.size + 1) ** 1.1
    p /= p.sum()
    filler = lambda n: rank[rng.choice(rank.size, size=n, p=p)]
    docs, meta = [], []
    for _ in range(n_benign):
        docs.append(filler(doc_len))
        meta.append({"unsafe": False, "category": "benign"})
    phrases = [np.asarray(x, np.int64) for x in planted]
    phrases += [rng.integers(3, vocab, size=phrase_len) for _ in range(n_unsafe - len(phrases))]
    for phrase in phrases:
        doc = filler(doc_len)
        at = int(rng.integers(0, doc_len - phrase.size))
        doc[at:at + phrase.size] = phrase
        docs.append(doc)
        meta.append({"unsafe": True, "category": "planted"})
    return [d.astype(np.int64) for d in docs], meta


class HostIndexVeto:
    """The host-side veto of row 4 (see the module docstring): TraceIndex queries + BCIScorer per beam.

    ``penalties`` recomputes ``veto_build.build_veto_table``'s entries for one running sequence from
    the index: if that module's definition changes, this must follow (the agreement line checks it).
    """

    def __init__(self, index, scorer, cfg, tau: float, min_prefix: int, context_len: int, min_risk: float = 0.5,
                 per_item_vocab: int = 0):
        self.index, self.scorer, self.cfg = index, scorer, cfg
        self.tau, self.min_prefix, self.c, self.min_risk = tau, min_prefix, context_len, min_risk
        self.per_item_vocab = per_item_vocab  # > 0: one index.count per vocabulary item (row 5)
        self.calls = 0

    def _continuations(self, suffix: list[int], pool: list[int] | None) -> list[int]:
        """Tokens t such that suffix + t occurs in the corpus: one next-token query, or (reference
        style) one count per item of ``pool``."""
        if pool is None:
            self.calls += 1
            return self.index.next_token_counts(suffix)[0].tolist()
        self.calls += len(pool)
        return [t for t in pool if self.index.count(suffix + [t])]

    def penalties(self, seq: list[int]) -> dict[int, float]:
        """{token: penalty (BCI, nats) > tau} for the next token after running sequence ``seq``."""
        windows: list[tuple[int, int, np.ndarray]] = []  # (suffix length k, next token, window)
        pool = None
        if self.per_item_vocab and len(seq) >= self.min_prefix:  # the reference: every vocabulary item
            pool = self._continuations(seq[len(seq) - self.min_prefix:], list(range(self.per_item_vocab)))
        for k in range(self.min_prefix, min(self.c, len(seq)) + 1):
            suffix = seq[len(seq) - k:]
            nxt = pool if pool is not None and k == self.min_prefix else self._continuations(suffix, pool)
            for t in nxt:
                occ = self.index.locate(suffix + [t], limit=1 << 30)
                self.calls += 2
                if not occ:
                    continue
                risk = self.index.doc_unsafe([d for d, _ in occ])
                for (doc_id, off), r in zip(occ, risk):
                    if r < self.min_risk:
                        continue
                    doc = self.index.doc_tokens(doc_id)
                    self.calls += 1
                    for m in range(max(self.cfg.min_span, k + 1), self.cfg.max_span + 1):
                        if off + m <= doc.size:
                            windows.append((k, t, doc[off:off + m]))
        if not windows:
            return {}
        prefixes = {(k, t): tuple(w[:k + 1].tolist()) for k, t, w in windows}
        uniq = list({tuple(w.tolist()) for _, _, w in windows} | set(prefixes.values()))
        self.calls += 1
        terms = self.scorer.score_arrays([np.asarray(x, np.int64) for x in uniq])
        bci = dict(zip(uniq, terms["bci"].astype(np.float32)))  # the build keeps span BCIs as float32
        conflict = dict(zip(uniq, terms["conflict"]))
        per_k: dict[int, dict[int, float]] = {}
        for k, t, w in windows:
            b = bci[tuple(w.tolist())]
            if not b > self.tau:  # only high-BCI spans of violating documents give entries
                continue
            if self.cfg.veto_weighting == "conflict":  # the BCI the continuation is expected to lead to
                share = conflict[prefixes[(k, t)]]
                pen = b * share if share > self.cfg.veto_min_conflict else 0.0
            else:
                pen = b
            if pen > self.tau:
                slot = per_k.setdefault(k, {})
                slot[t] = max(slot.get(t, 0.0), float(np.float32(pen)))
        out: dict[int, float] = {}
        for slot in per_k.values():  # the table keeps the max_entries largest penalties per context
            for t, pen in sorted(slot.items(), key=lambda kv: -kv[1])[: self.cfg.max_entries]:
                out[t] = max(out.get(t, 0.0), pen)
        return {t: p for t, p in out.items() if p > self.tau}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--benign-docs", type=int, default=3000)
    ap.add_argument("--unsafe-docs", type=int, default=600)
    ap.add_argument("--doc-len", type=int, default=48)
    ap.add_argument("--n-min", type=int, default=4)
    ap.add_argument("--n-max", type=int, default=8, help="longest veto span (context window C = n_max - 1)")
    ap.add_argument("--tau", type=float, default=30.0, help="BCI threshold (nats) of the table and the veto")
    ap.add_argument("--min-prefix", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--hf-repeats", type=int, default=3)
    ap.add_argument("--ref-repeats", type=int, default=1,
                    help="runs of row 5 (a per-vocabulary-item processor: ~1-2 min each at vocab 32k); 0 skips it")
    ap.add_argument("--ref-agreement", type=int, default=48, help="running contexts checked for row 5's veto sets")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch intra-op threads for HF (0 = torch default). On a shared machine 1 avoids "
                         "OpenMP spin-waiting that can make a 0.6 s generate take 10 s of CPU")
    args = ap.parse_args()

    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LogitsProcessor,
        LogitsProcessorList,
    )

    from tracealign_jax.config import DecodeConfig, ProvenanceConfig
    from tracealign_jax.decoding.runner import Decoder, left_pad
    from tracealign_jax.hf_io import load_hf
    from tracealign_jax.index import TraceIndex, build_index_from_tokens
    from tracealign_jax.provenance.bci import BCIScorer
    from tracealign_jax.provenance.veto_build import build_veto_table
    from tracealign_jax.veto.table import veto_entries

    torch.manual_seed(0)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    hf_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)  # fmt: skip
    hf_model = LlamaForCausalLM(hf_cfg).eval()
    tmp = Path(tempfile.mkdtemp(prefix="decode_bench_"))
    hf_model.save_pretrained(tmp / "model")
    model, _ = load_hf(tmp / "model", progress=False)

    rng = np.random.default_rng(0)
    lens = rng.integers(args.n_max, args.prompt_len + 1, size=args.batch)
    prompts = [[int(t) for t in rng.integers(3, args.vocab, size=n)] for n in lens]
    tokens, valid = left_pad(prompts, args.prompt_len, args.batch, 0)
    base = DecodeConfig(method="beam", num_beams=args.beams, max_new_tokens=args.max_new, length_penalty=0.6,
                        prompt_buckets=(args.prompt_len,), batch_size=args.batch)  # fmt: skip
    never_eos = args.vocab + 1  # outside the vocabulary: every search runs max_new steps
    plain = Decoder(model, base, eos_id=never_eos)
    compile_s = {}
    t0 = time.perf_counter()
    first = jax.device_get(plain.decode_batch(tokens, valid))
    compile_s["off"] = time.perf_counter() - t0  # first call: trace + compile + one run

    # Provenance: violating documents quote (prompt tail + first generated tokens) of each row's best
    # unvetoed beam, so the veto fires on the searched paths; plus random rare phrases.
    half = args.n_max // 2
    planted = [p[-(args.n_max - half):] + [int(t) for t in first.tokens_BxKxT[r, 0, :half]] for r, p in enumerate(prompts)]
    docs, meta = synthetic_corpus(rng, args.vocab, planted, n_benign=args.benign_docs, n_unsafe=args.unsafe_docs,
                                  doc_len=args.doc_len, phrase_len=args.n_max)  # fmt: skip
    t0 = time.perf_counter()
    index = TraceIndex.open(build_index_from_tokens(docs, tmp / "index", vocab_size=args.vocab, metadata=meta))
    index_s = time.perf_counter() - t0
    pcfg = ProvenanceConfig(min_span=args.n_min, max_span=args.n_max, max_entries=16, sample_size=64)
    scorer = BCIScorer(index, pcfg)
    t0 = time.perf_counter()
    table, info = build_veto_table(index, scorer, pcfg, args.tau, progress=False)
    table = jax.tree.map(jax.numpy.asarray, table)
    table_s = time.perf_counter() - t0
    c = table.context_len
    vcfg = DecodeConfig(**{**base.__dict__, "veto": "hard", "tau": args.tau, "min_prefix": args.min_prefix})
    veto = Decoder(model, vcfg, eos_id=never_eos, veto_table=table)
    t0 = time.perf_counter()
    out_veto = jax.device_get(veto.decode_batch(tokens, valid))
    compile_s["hard"] = time.perf_counter() - t0

    # Agreement: every running context of every beam of the unvetoed search, both lookups.
    host = HostIndexVeto(index, scorer, pcfg, args.tau, args.min_prefix, c)
    seqs = [prompts[r] + [int(t) for t in first.tokens_BxKxT[r, j, :i]]
            for r in range(args.batch) for j in range(args.beams) for i in range(args.max_new)]
    ctx = np.zeros((len(seqs), c), np.int32)
    for i, s in enumerate(seqs):
        ctx[i, c - min(c, len(s)):] = s[-c:]
    ids, pens, ok = jax.device_get(jax.jit(veto_entries, static_argnums=(3,))(
        table, jax.numpy.asarray(ctx), jax.numpy.full((len(seqs),), c, jax.numpy.int32), args.min_prefix))
    agree = vetoed_ctx = vetoed_tok = 0
    vetoing: list[int] = []
    for i, s in enumerate(seqs):
        hit = ok[i] & (pens[i] > args.tau)
        dev = {int(t): float(p) for t, p in zip(ids[i][hit], pens[i][hit])}
        ref = host.penalties(s)
        same = dev.keys() == ref.keys() and all(abs(dev[t] - ref[t]) <= 1e-3 * max(1.0, ref[t]) for t in ref)
        agree += same
        vetoed_ctx += bool(ref)
        vetoed_tok += len(ref)
        if ref:
            vetoing.append(i)
    per_item = HostIndexVeto(index, scorer, pcfg, args.tau, args.min_prefix, c, per_item_vocab=args.vocab)
    sample = np.random.default_rng(1).permutation(len(seqs))[: args.ref_agreement]
    sample = sorted(set(sample.tolist()) | set(vetoing)) if args.ref_repeats else []
    ref_agree = sum(per_item.penalties(seqs[i]) == host.penalties(seqs[i]) for i in sample)

    # Timing, ours: interleaved repeats.
    runs = {"off": ([], []), "hard": ([], [])}
    for _ in range(args.repeats):
        for name, dec in (("off", plain), ("hard", veto)):
            w, cp = _timed(lambda dec=dec: jax.block_until_ready(dec.decode_batch(tokens, valid)))
            runs[name][0].append(w)
            runs[name][1].append(cp)

    host_s = [0.0]  # wall seconds spent inside the processor

    class IndexVeto(LogitsProcessor):
        def __init__(self, veto: HostIndexVeto = host):
            self.veto = veto

        def __call__(self, input_ids, scores):
            t = time.perf_counter()
            for row, seq in enumerate(input_ids.tolist()):
                for tok in self.veto.penalties(seq):
                    scores[row, tok] = -float("inf")
            host_s[0] += time.perf_counter() - t
            return scores

    ids_t = torch.tensor(tokens, dtype=torch.long)
    mask = torch.tensor(valid, dtype=torch.long)
    gen_kw = dict(attention_mask=mask, num_beams=args.beams, max_new_tokens=args.max_new,
                  min_new_tokens=args.max_new, do_sample=False, pad_token_id=0, eos_token_id=2,
                  length_penalty=0.6)  # fmt: skip
    hf_runs = {"off": ([], []), "hard": ([], [])}
    hf_first = {}
    with torch.no_grad():
        for name, procs in (("off", []), ("hard", [IndexVeto()])):
            hf_first[name] = _timed(lambda p=procs: hf_model.generate(ids_t, logits_processor=LogitsProcessorList(p), **gen_kw))[0]
        host.calls, host_s[0] = 0, 0.0
        for _ in range(args.hf_repeats):
            for name, procs in (("off", []), ("hard", [IndexVeto()])):
                w, cp = _timed(lambda p=procs: hf_model.generate(ids_t, logits_processor=LogitsProcessorList(p), **gen_kw))
                hf_runs[name][0].append(w)
                hf_runs[name][1].append(cp)
        calls_per_run = host.calls // max(args.hf_repeats, 1)
        host_ms_per_run = 1e3 * host_s[0] / max(args.hf_repeats, 1)  # row 4's processor time, before row 5
        ref_runs: tuple[list[float], list[float]] = ([], [])
        per_item.calls = 0
        for _ in range(args.ref_repeats):  # row 5; HF and torch are warm from rows 3-4
            w, cp = _timed(lambda: hf_model.generate(ids_t, logits_processor=LogitsProcessorList([IndexVeto(per_item)]), **gen_kw))
            ref_runs[0].append(w)
            ref_runs[1].append(cp)

    med = lambda xs: statistics.median(xs)
    new_tokens = args.batch * args.max_new
    print(f"\ndecode_bench: vocab {args.vocab}, hidden {args.hidden}, layers {args.layers}, batch {args.batch}, "
          f"beams {args.beams}, prompt bucket {args.prompt_len}, {args.max_new} new tokens, "
          f"devices: {jax.devices()[0].platform} x{len(jax.devices())}, torch threads {torch.get_num_threads()}")
    print(f"provenance: {len(docs)} docs / {index.num_tokens} tokens indexed in {index_s:.1f}s; veto table "
          f"{info['num_spans']} spans > tau={args.tau} -> {table.num_contexts} contexts / {table.num_entries} entries "
          f"(C={c}, built in {table_s:.1f}s); min_prefix {args.min_prefix}")
    print(f"agreement (device table vs host index queries), {len(seqs)} running contexts of the unvetoed "
          f"search: {agree}/{len(seqs)} identical veto sets; {vetoed_ctx} contexts veto {vetoed_tok} tokens")
    if args.ref_repeats:
        print(f"agreement (row 5's per-vocabulary-item look-ups vs row 4's), {len(sample)} running contexts "
              f"(every vetoing one + a random sample): {ref_agree}/{len(sample)} identical veto sets")
    rows = [
        ("ours beam, no veto", runs["off"], compile_s["off"]),
        ("ours Prov-Decode (hard veto)", runs["hard"], compile_s["hard"]),
        ("HF generate beams, no processor", hf_runs["off"], hf_first["off"]),
        ("HF generate + host index veto", hf_runs["hard"], hf_first["hard"]),
    ]
    if args.ref_repeats:
        rows.append(("HF generate + reference-style veto", ref_runs, float("nan")))
    print(f"{'method':32s} {'wall med s':>10s} {'CPU med s':>10s} {'wall best s':>11s} {'tok/s med':>10s} "
          f"{'reps':>4s} {'1st call s':>10s}")
    for name, (wall, cpu), first_s in rows:
        print(f"{name:32s} {med(wall):10.4f} {med(cpu):10.4f} {min(wall):11.4f} {new_tokens / med(wall):10.1f} "
              f"{len(wall):4d} {first_s:10.2f}")
    ow = 100 * (med(runs["hard"][0]) / med(runs["off"][0]) - 1)
    oc = 100 * (med(runs["hard"][1]) / med(runs["off"][1]) - 1)
    print(f"veto overhead (ours), medians of {args.repeats}: wall {ow:+.1f}%, CPU {oc:+.1f}%   (target <= +5%)")
    sw = med(hf_runs["hard"][0]) / med(runs["hard"][0])
    sc = med(hf_runs["hard"][1]) / med(runs["hard"][1])
    print(f"Prov-Decode vs HF generate + host index veto, medians: wall {sw:.1f}x, CPU {sc:.1f}x faster   "
          f"(target >= 10x); vs HF without processor: wall {med(hf_runs['off'][0]) / med(runs['off'][0]):.1f}x; "
          f"HF host-veto overhead: wall {100 * (med(hf_runs['hard'][0]) / med(hf_runs['off'][0]) - 1):+.0f}%")
    if args.ref_repeats:
        print(f"Prov-Decode vs HF generate + reference-style veto (one index call per vocabulary item, "
              f"{per_item.calls // args.ref_repeats} calls per run): wall {med(ref_runs[0]) / med(runs['hard'][0]):.0f}x, "
              f"CPU {med(ref_runs[1]) / med(runs['hard'][1]):.0f}x faster   (target >= 10x)")
    veto_ms = 1e3 * (med(runs["hard"][0]) - med(runs["off"][0]))
    print(f"veto cost per decode (wall): ours {veto_ms:+.1f} ms (median difference); HF host processor "
          f"{host_ms_per_run:.1f} ms inside the processor, "
          f"{calls_per_run} index/scorer calls per run")
    print(f"vetoes counted on the best beams: {int(out_veto.vetoes_BxK[:, 0].sum())}")


if __name__ == "__main__":
    main()
