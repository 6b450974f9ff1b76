"""Veto table: host build time and size for 1M high-BCI spans; device lookup time per decoding step.

    .venv/bin/python benchmarks/veto_bench.py [--spans 1_000_000] [--batch 64] [--vocab 128_000]

Build: vectorized ``compile_veto_table`` over packed spans vs a Python-dict build of the same
mapping (on a --dict-spans subset, extrapolated linearly). Lookup: one jitted ``veto_penalties``
(dense [B, V]) and ``veto_entries`` (sparse) per step on right-aligned contexts of n_max - 1 tokens,
vs the host path a decoder without the table would take each step (Python dict lookups + NumPy
scatter + transfer of the [B, V] penalties to the device).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def synthetic_spans(rng: np.random.Generator, n: int, vocab: int, n_min: int, n_max: int):
    """Packed spans: zipf tokens (shared prefixes, like real text), lengths n_min..n_max, BCI in nats."""
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    tokens = rng.choice(vocab, size=(n, n_max), p=p / p.sum()).astype(np.int64)
    lengths = rng.integers(n_min, n_max + 1, size=n)
    bci = rng.uniform(20.0, 80.0, size=n).astype(np.float32)
    return tokens, lengths, bci


def dict_build(tokens, lengths, bci, max_entries: int) -> dict:
    d: dict[tuple, dict[int, float]] = {}
    for t, n, b in zip(tokens.tolist(), lengths.tolist(), bci.tolist()):
        for k in range(1, n):
            nxt = d.setdefault(tuple(t[:k]), {})
            if nxt.get(t[k], 0.0) < b:
                nxt[t[k]] = b
    return {c: dict(sorted(v.items(), key=lambda kv: -kv[1])[:max_entries]) for c, v in d.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=1_000_000)
    ap.add_argument("--dict-spans", type=int, default=100_000)
    ap.add_argument("--vocab", type=int, default=128_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n-min", type=int, default=4)
    ap.add_argument("--n-max", type=int, default=12)
    ap.add_argument("--max-entries", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the dense reference forms live in tests/
    from tests.veto_dense import apply_veto, veto_penalties
    from tracealign_jax.veto.store import compile_veto_table
    from tracealign_jax.veto.table import veto_entries

    rng = np.random.default_rng(0)
    tokens, lengths, bci = synthetic_spans(rng, args.spans, args.vocab, args.n_min, args.n_max)
    t = time.perf_counter()
    table = compile_veto_table((tokens, lengths, bci), max_span=args.n_max, max_entries=args.max_entries)
    t_build = time.perf_counter() - t
    m = args.dict_spans
    t = time.perf_counter()
    ref = dict_build(tokens[:m], lengths[:m], bci[:m], args.max_entries)
    t_dict = (time.perf_counter() - t) * args.spans / m

    dev = jax.tree.map(jnp.asarray, table)
    c = args.n_max - 1
    # half the rows end inside a span prefix (hits), half are random (misses)
    ctx = rng.choice(args.vocab, size=(args.batch, c)).astype(np.int32)
    for i in range(0, args.batch, 2):
        j = int(rng.integers(m))
        k = int(rng.integers(1, lengths[j]))
        ctx[i, c - k:] = tokens[j, :k]
    lens = np.full(args.batch, c, np.int32)
    ctx_d, lens_d = jnp.asarray(ctx), jnp.asarray(lens)
    dense = jax.jit(veto_penalties, static_argnums=(3, 4))
    sparse = jax.jit(veto_entries, static_argnums=(3,))

    def time_step(fn) -> float:
        jax.block_until_ready(fn())
        t = time.perf_counter()
        for _ in range(args.steps):
            out = fn()
        jax.block_until_ready(out)
        return (time.perf_counter() - t) / args.steps

    t_dense = time_step(lambda: dense(dev, ctx_d, lens_d, args.vocab, 1))
    t_sparse = time_step(lambda: sparse(dev, ctx_d, lens_d, 1))
    # in place on donated logits: what a decoding step does with the sparse entries
    apply = jax.jit(apply_veto, static_argnums=(5,), donate_argnums=(0,))
    logits = [jnp.zeros((args.batch, args.vocab), jnp.float32)]

    def apply_step():
        logits[0] = apply(logits[0], dev, ctx_d, lens_d, 1.0, 1)
        return logits[0]

    t_apply = time_step(apply_step)

    def host_step():
        pen = np.zeros((args.batch, args.vocab), np.float32)
        for i, row in enumerate(ctx.tolist()):
            for k in range(1, c + 1):
                for tok, p in ref.get(tuple(row[c - k:]), {}).items():
                    pen[i, tok] = max(pen[i, tok], p)
        return jax.device_put(pen)

    t_host = time_step(host_step)
    got = np.asarray(dense(dev, ctx_d, lens_d, args.vocab, 1))
    hits = int((got.max(axis=1) > 0).sum())

    mb = table.nbytes() / 1e6
    print(f"\n{args.spans:,} high-BCI spans (lengths {args.n_min}-{args.n_max}, vocab {args.vocab:,}) -> "
          f"{table.num_contexts:,} contexts, {table.num_entries:,} entries, {mb:.1f} MB "
          f"({table.nbytes() / args.spans:.1f} bytes/span), hi_run {table.hi_run}")
    print("| measure | ours | un-optimized path |")
    print("|---|---|---|")
    print(f"| build 1M spans (s) | {t_build:.2f} (vectorized NumPy) | {t_dict:.2f} (Python dict, extrapolated from "
          f"{m:,}) |")
    print(f"| lookup per step, B={args.batch}, V={args.vocab:,}, dense [B,V] (ms) | {1e3 * t_dense:.3f} (jit, "
          f"{jax.devices()[0].platform}) | {1e3 * t_host:.3f} (host dict + scatter + device_put) |")
    print(f"| lookup per step, sparse entries [B, E] (ms) | {1e3 * t_sparse:.3f} | - |")
    print(f"| lookup + veto applied to donated logits in place (ms) | {1e3 * t_apply:.3f} | - |")
    print(f"rows with a veto in the timed batch: {hits}/{args.batch}")


if __name__ == "__main__":
    main()
