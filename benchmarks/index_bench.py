"""TraceIndex vs infini-gram on one synthetic zipf corpus: build, size, and every query the issue names.

    .venv/bin/python benchmarks/index_bench.py                 # 10 M tokens, 32 k vocab, 500-token docs
    .venv/bin/python benchmarks/index_bench.py --tokens 100M
    .venv/bin/python benchmarks/index_bench.py --tokens 1M --quick   # a smoke run
    .venv/bin/python benchmarks/index_bench.py --tokens 100M --skip-peer   # ours only (no infini-gram build)

Both indexes are built from the same token ids: ours with ``build_index_from_tokens`` (in a spawned
process, so its peak RSS is its own), infini-gram's by writing its ``tokenized.0`` / ``offset.0``
files (u16, each document prefixed by 0xFFFF) and running its bundled ``rust_indexing``
make-part / merge / concat steps exactly as its ``indexing.py`` does. Counts are checked equal on
sampled queries (with ``--skip-peer``: against a NumPy scan of the corpus instead). Prints one
side-by-side table, and the load average before and after (the timings are wall clock).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_count(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * mult)


def zipf_corpus(num_tokens: int, vocab: int, doc_len: int, seed: int) -> np.ndarray:
    """uint16 token ids drawn from Zipf(1) over ``vocab`` ids (rank r has p ~ 1/r), shuffled ids."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)
    cdf = np.cumsum(p / p.sum())
    ranks = np.searchsorted(cdf, rng.random(num_tokens // doc_len * doc_len), side="right")
    perm = rng.permutation(vocab).astype(np.uint16)
    return perm[np.minimum(ranks, vocab - 1)]


def _build_ours(tokens_path: str, out_dir: str, doc_len: int, vocab: int, repeats: int, q: mp.Queue) -> None:
    from tracealign_jax.index import build_index_from_tokens

    with tempfile.TemporaryDirectory() as tmp:  # one-time process costs (imports, numba cache load) off the clock
        build_index_from_tokens([np.arange(300) % vocab], Path(tmp) / "warm", vocab_size=vocab,
                                metadata=[{"unsafe": False}])
    tokens = np.load(tokens_path)
    docs = np.split(tokens, len(tokens) // doc_len)
    meta = [{"unsafe": bool(d % 7 == 0), "category": "c"} for d in range(len(docs))]
    seconds, cpu = [], []
    for _ in range(repeats):
        c0 = _cpu_seconds(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        build_index_from_tokens(docs, out_dir, vocab_size=vocab, metadata=meta, progress=False, overwrite=True)
        seconds.append(time.perf_counter() - t0)
        cpu.append(_cpu_seconds(resource.RUSAGE_SELF) - c0)
    q.put((seconds, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def _cpu_seconds(who: int) -> float:
    """User + system CPU seconds of this process (all threads) or of its waited-for children."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def build_ours(tokens: np.ndarray, work: Path, doc_len: int, vocab: int, repeats: int
               ) -> tuple[list[float], list[float], int, Path]:
    """Builds ``repeats`` times in one spawned process; (wall seconds per build, CPU seconds per
    build, peak RSS, index dir)."""
    np.save(work / "tokens.npy", tokens)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_build_ours, args=(str(work / "tokens.npy"), str(work / "ours"), doc_len, vocab, repeats,
                                              q))
    p.start()
    seconds, cpu, rss = q.get()
    p.join()
    return seconds, cpu, rss, work / "ours"


def build_infini(tokens: np.ndarray, work: Path, doc_len: int, cpus: int, name: str = "infini"
                 ) -> tuple[float, float, int, Path]:
    """Writes tokenized.0 / offset.0 and runs rust_indexing as infini_gram/indexing.py does (v4)."""
    import infini_gram

    binary = Path(infini_gram.__file__).parent / "rust_indexing"
    out = work / name
    out.mkdir()
    c0 = _cpu_seconds(resource.RUSAGE_CHILDREN) + _cpu_seconds(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    docs = tokens.reshape(-1, doc_len)
    with_sep = np.empty((docs.shape[0], doc_len + 1), np.uint16)
    with_sep[:, 0] = 0xFFFF
    with_sep[:, 1:] = docs
    with_sep.tofile(out / "tokenized.0")
    (np.arange(docs.shape[0], dtype=np.uint64) * (2 * (doc_len + 1))).tofile(out / "offset.0")
    ds = str(out / "tokenized.0")
    ds_size = os.path.getsize(ds)
    ratio = int(np.ceil(np.log2(ds_size) / 8))
    hack = 100000
    size = ds_size // cpus
    size += size % 2  # whole tokens
    parts, merged = work / "parts", work / "merged"
    parts.mkdir()
    merged.mkdir()
    procs = [subprocess.Popen([str(binary), "make-part", "--data-file", ds, "--parts-dir", str(parts),
                               "--start-byte", str(i * size), "--end-byte", str(min((i + 1) * size + hack, ds_size)),
                               "--ratio", str(ratio), "--token-width", "2"], stdout=subprocess.DEVNULL)
             for i in range(cpus)]
    assert all(p.wait() == 0 for p in procs), "rust_indexing make-part failed"
    subprocess.run([str(binary), "merge", "--data-file", ds, "--parts-dir", str(parts), "--merged-dir", str(merged),
                    "--num-threads", str(cpus), "--hacksize", str(hack), "--ratio", str(ratio), "--token-width", "2"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run([str(binary), "concat", "--data-file", ds, "--merged-dir", str(merged), "--merged-file",
                    str(out / "table.0"), "--num-threads", str(cpus), "--ratio", str(ratio), "--token-width", "2"],
                   check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds(resource.RUSAGE_CHILDREN) + _cpu_seconds(resource.RUSAGE_SELF) - c0
    shutil.rmtree(parts)
    shutil.rmtree(merged)
    return seconds, cpu, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, out


def timed(fn, items) -> np.ndarray:
    """Per-call wall times in microseconds."""
    out = np.empty(len(items))
    for i, item in enumerate(items):
        t = time.perf_counter()
        fn(item)
        out[i] = time.perf_counter() - t
    return out * 1e6


def sample_queries(tokens: np.ndarray, doc_len: int, n: int, rng: np.random.Generator, lens=(1, 6)) -> list[np.ndarray]:
    """Spans copied from inside random documents (so most occur), lengths in [lens[0], lens[1]]."""
    out = []
    for _ in range(n):
        ln = int(rng.integers(lens[0], lens[1] + 1))
        d = int(rng.integers(len(tokens) // doc_len))
        o = int(rng.integers(doc_len - ln + 1))
        out.append(tokens[d * doc_len + o:d * doc_len + o + ln].astype(np.int64))
    return out


def generations(tokens: np.ndarray, vocab: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """256-token 'generations': corpus snippets of 4-40 tokens interleaved with random tokens."""
    gens = []
    for _ in range(n):
        parts, total = [], 0
        while total < 256:
            if rng.random() < 0.6:
                ln = int(rng.integers(4, 41))
                s = int(rng.integers(len(tokens) - ln))
                parts.append(tokens[s:s + ln].astype(np.int64))
            else:
                parts.append(rng.integers(0, vocab, int(rng.integers(1, 8))))
            total += len(parts[-1])
        gens.append(np.concatenate(parts)[:256])
    return gens


def scan_count(tokens: np.ndarray, doc_len: int, q: np.ndarray, room: int = 0) -> int:
    """Occurrences of q inside documents with ``room`` more tokens of the document after them, by
    comparing every window (the --skip-peer check)."""
    hits = np.ones(len(tokens) - len(q) + 1, bool)
    for k, t in enumerate(q):
        hits &= tokens[k:len(tokens) - len(q) + 1 + k] == t
    starts = np.flatnonzero(hits)
    return int((starts % doc_len + len(q) + room <= doc_len).sum())  # windows inside one document


class _NoPeer:
    """Stands in for infini-gram under --skip-peer: every call returns at once (its timings are unused)."""

    def count(self, **_):
        return {"count": 0}

    def creativity(self, **_):
        return {"rs": []}

    def attribute(self, **_):
        return {}

    def ntd(self, **_):
        return {"prompt_cnt": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="10M", help="corpus size, e.g. 10M or 100M")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--doc-len", type=int, default=500)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="fewer timed queries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where to build (default: a temp dir, removed)")
    ap.add_argument("--build-repeats", type=int, default=3, help="builds per index; the median is reported")
    ap.add_argument("--skip-peer", action="store_true",
                    help="do not build / query infini-gram (its columns read '-'); counts are checked by a scan")
    args = ap.parse_args()
    n_tok = parse_count(args.tokens)
    reps = 5 if args.quick else 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="index_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed + 1)
    try:
        tokens = zipf_corpus(n_tok, args.vocab, args.doc_len, args.seed)
        n_tok = len(tokens)
        print(f"corpus: {n_tok:,} zipf tokens, vocab {args.vocab}, {n_tok // args.doc_len:,} docs of {args.doc_len}")
        load_before = os.getloadavg()
        from tracealign_jax.index import TraceIndex

        if args.skip_peer:
            eng = _NoPeer()
        else:
            # infini-gram first: its peak RSS is read from RUSAGE_CHILDREN, which our spawned build would join
            inf_runs, inf_cpu = [], []
            for i in range(args.build_repeats):
                inf_s, cpu_s, inf_rss, inf_dir = build_infini(tokens, work, args.doc_len, args.cpus, f"infini{i}")
                inf_runs.append(inf_s)
                inf_cpu.append(cpu_s)
                if i + 1 < args.build_repeats:
                    shutil.rmtree(inf_dir)
            inf_s = float(np.median(inf_runs))
            from infini_gram.engine import InfiniGramEngine

            eng = InfiniGramEngine(index_dir=str(inf_dir), eos_token_id=0, vocab_size=65535, token_dtype="u16",
                                   precompute_unigram_logprobs=True)
        ours_runs, ours_cpu, ours_rss, ours_dir = build_ours(tokens, work, args.doc_len, args.vocab,
                                                             args.build_repeats)
        ours_s = float(np.median(ours_runs))
        ix = TraceIndex.open(ours_dir)
        ours_bytes = sum(f.stat().st_size for f in ours_dir.rglob("*") if f.is_file())
        ours_core = sum((ours_dir / f).stat().st_size for f in ("tokens.bin", "suffix_array.bin"))
        if not args.skip_peer:
            inf_bytes = sum(f.stat().st_size for f in inf_dir.iterdir())
            inf_core = sum((inf_dir / f).stat().st_size for f in ("tokenized.0", "table.0"))

        # correctness: counts equal on sampled spans (mostly present) + random spans (mostly absent)
        if args.skip_peer:  # a scan of the corpus per query: few queries
            check = sample_queries(tokens, args.doc_len, 20, rng) + [rng.integers(0, args.vocab, 2) for _ in range(5)]
            inf_counts = np.array([scan_count(tokens, args.doc_len, q) for q in check])
        else:
            check = sample_queries(tokens, args.doc_len, 3000, rng) + [rng.integers(0, args.vocab, 3) for _ in range(500)]
            inf_counts = np.array([eng.count(input_ids=q.tolist())["count"] for q in check])
        ours_counts = ix.count_batch(check)
        mismatches = int((ours_counts != inf_counts).sum())

        singles = sample_queries(tokens, args.doc_len, 20000 // reps, rng)
        singles_l = [q.tolist() for q in singles]
        ix.count(singles[0])
        ours_single = timed(ix.count, singles)
        ours_single_2 = timed(ix.count, singles)  # a second pass: the pages are resident now
        inf_single = timed(lambda q: eng.count(input_ids=q), singles_l[:4000 // reps])

        batch = sample_queries(tokens, args.doc_len, 1_000_000 // reps, rng)
        ix.count_batch(batch[:1000])
        ix.longest_matches_batch(gens_warm := generations(tokens, args.vocab, 2, rng))
        ix.maximal_spans_batch(gens_warm)
        batch_s, batch_cpu = [], []
        for _ in range(3):  # median of three runs
            c = _cpu_seconds(resource.RUSAGE_SELF)
            t = time.perf_counter()
            ix.count_batch(batch)
            batch_s.append(time.perf_counter() - t)
            batch_cpu.append(_cpu_seconds(resource.RUSAGE_SELF) - c)
        ours_batch_qps = len(batch) / float(np.median(batch_s))
        inf_qps = 1e6 / inf_single.mean()

        gens = generations(tokens, args.vocab, 40 // reps, rng)
        gens_l = [g.tolist() for g in gens]
        ix.longest_matches(gens[0])
        ours_long = timed(ix.longest_matches, gens)
        inf_long = timed(lambda g: eng.creativity(input_ids=g), gens_l)
        # infini-gram's creativity returns rs[i] = end of the longest match starting at i
        creativity_ok = args.skip_peer or all(
            np.array_equal(ix.longest_matches(g) + np.arange(len(g)), eng.creativity(input_ids=gl)["rs"])
            for g, gl in zip(gens[:5], gens_l[:5]))
        ix.maximal_spans(gens[0])
        ours_max = timed(ix.maximal_spans, gens)
        inf_max = timed(lambda g: eng.attribute(input_ids=g, delim_ids=[], min_len=1, max_cnt=10**9,
                                                enforce_bow=False), gens_l)

        ctx = sample_queries(tokens, args.doc_len, 2000 // reps, rng, lens=(2, 2))
        ix.next_token_counts(ctx[0])
        ix.next_token_counts_batch(ctx[:300])  # first calls load the compiled kernels from numba's cache
        ours_next = timed(ix.next_token_counts, ctx)
        inf_next = timed(lambda c: eng.ntd(prompt_ids=c), [c.tolist() for c in ctx[:500 // reps]])
        t = time.perf_counter()
        ix.next_token_counts_batch(ctx)
        ours_next_batch = len(ctx) / (time.perf_counter() - t)
        ids, counts = ix.next_token_counts(ctx[0])
        # exact: every occurrence with a next token in its document (infini-gram's prompt_cnt also counts
        # occurrences at a document's end, and its distribution is sampled)
        next_ok = int(counts.sum()) == scan_count(tokens, args.doc_len, ctx[0], room=1)
        if args.skip_peer:
            inf_s = inf_rss = inf_bytes = inf_core = float("nan")
            inf_runs, inf_cpu = [], [float("nan")]

        med = lambda x: f"{np.median(x):,.1f} us"  # noqa: E731
        load_after = os.getloadavg()
        rows = [
            ("build throughput", f"{n_tok / inf_s / 1e6:.2f} M tok/s", f"{n_tok / ours_s / 1e6:.2f} M tok/s", ">= 7 M tok/s"),
            ("build wall time, median of runs", f"{inf_s:.2f} s ({' / '.join(f'{x:.2f}' for x in inf_runs)})",
             f"{ours_s:.2f} s ({' / '.join(f'{x:.2f}' for x in ours_runs)})", ""),
            ("build CPU time (all threads), median", f"{np.median(inf_cpu):.2f} s", f"{np.median(ours_cpu):.2f} s",
             "(load-independent)"),
            ("peak build RSS (whole process)", f"{inf_rss / 2**20:,.0f} MiB ({inf_rss / n_tok:.1f} B/tok)",
             f"{ours_rss / 2**20:,.0f} MiB ({ours_rss / n_tok:.1f} B/tok)", ""),
            ("index size, all files", f"{inf_bytes / n_tok:.2f} bytes/token", f"{ours_bytes / n_tok:.2f} bytes/token", "<= 5.0"),
            ("  of which tokens + suffix array", f"{inf_core / n_tok:.2f} bytes/token", f"{ours_core / n_tok:.2f} bytes/token", ""),
            ("single count, median", med(inf_single), f"{med(ours_single)} (2nd pass {med(ours_single_2)})",
             "<= 10 us"),
            ("single count, p99", f"{np.percentile(inf_single, 99):,.1f} us",
             f"{np.percentile(ours_single, 99):,.1f} us (2nd pass {np.percentile(ours_single_2, 99):,.1f} us)",
             "<= 25 us"),
            ("batched count", f"{inf_qps / 1e3:,.1f} K q/s (1 per call)", f"{ours_batch_qps / 1e6:.2f} M q/s", ">= 1 M q/s"),
            ("batched count per CPU-second (all threads)", "", f"{len(batch) / np.median(batch_cpu) / 1e6:.2f} M q/s",
             "(load-independent)"),
            ("longest match, 256 positions, median", f"{np.median(inf_long) / 1e3:.2f} ms", f"{np.median(ours_long) / 1e3:.3f} ms", "<= 1 ms"),
            ("maximal spans + counts + ranking, 256 tok", f"{np.median(inf_max) / 1e3:.2f} ms", f"{np.median(ours_max) / 1e3:.3f} ms", "<= 3 ms"),
            ("next-token counts, 2-token ctx, median", med(inf_next) + " (approx)", med(ours_next) + " (exact)", "<= 20 us"),
            ("next-token counts batched", f"{1e6 / inf_next.mean():,.0f} ctx/s", f"{ours_next_batch:,.0f} ctx/s", ""),
        ]
        w = [max(len(r[i]) for r in rows + [("measure", "infini-gram", "TraceIndex (ours)", "target")]) for i in range(4)]
        line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
        print(line(("measure", "infini-gram", "TraceIndex (ours)", "target")))
        print("|" + "|".join("-" * (x + 2) for x in w) + "|")
        for r in rows:
            print(line(r) if not args.skip_peer else line((r[0], "-", r[2], r[3])))
        if args.skip_peer:
            print(f"checks (infini-gram skipped): counts equal to a corpus scan on {len(check) - mismatches}/"
                  f"{len(check)} queries ({int((inf_counts > 0).sum())} present); next-token total == a corpus scan: {next_ok}")
        else:
            print(f"checks: counts equal on {len(check) - mismatches}/{len(check)} sampled queries "
                  f"({int((inf_counts > 0).sum())} present); longest matches == infini-gram creativity on 5 gens: "
                  f"{creativity_ok}; next-token total == a corpus scan: {next_ok}")
        print(f"{ix.num_shards} shards, {ix.manifest['sa_bits']}-bit SA; cpus={args.cpus}; load average (1/5/15 min) "
              f"before {'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)}")
        if mismatches:
            raise SystemExit(f"{mismatches} count mismatches against {'the scan' if args.skip_peer else 'infini-gram'}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
