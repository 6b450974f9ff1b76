"""Self-attention forward + backward per ``model.attention`` implementation, against the einsum reference.

Causal attention over ``--rows`` rows of each ``--lengths`` slots (train_bench's heads: 8 query heads,
4 KV heads, head dim 32; float32; every slot real), the gradient of a nonlinear function of the output
w.r.t. q, k and v, jitted. Implementations: einsum and blocked everywhere, xla everywhere, cudnn on
GPU, splash on TPU (``--impls`` to choose). Calls are interleaved (one of each per round) and the
median of ``--reps`` rounds is printed with the speed-up over einsum and the largest difference of the
value and gradients from einsum's, relative to the largest magnitude of each.

    .venv/bin/python benchmarks/attention_bench.py [--lengths 192 768 2048] [--rows 8] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

HEADS, KV_HEADS, HEAD_DIM = 8, 4, 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[192, 768, 2048])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--impls", nargs="+", default=None, help="default: einsum blocked xla, plus this platform's kernel")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from tracealign_jax.model.attention import QUERY_BLOCK, causal_attention

    platform = jax.default_backend()
    impls = args.impls or ["einsum", "blocked", "xla"] + {"gpu": ["cudnn"], "tpu": ["splash"]}.get(platform, [])
    print(f"backend {platform}, {args.rows} rows, {HEADS} / {KV_HEADS} heads of {HEAD_DIM}, float32, blocks of "
          f"{QUERY_BLOCK} queries; median of {args.reps} interleaved rounds, forward + backward")
    print("| length | " + " | ".join(f"{i} ms" for i in impls) + " | " + " | ".join(f"{i} vs einsum" for i in impls[1:])
          + " | max diff from einsum / max abs |")  # fmt: skip
    print("|---|" + "---|" * (2 * len(impls)))
    for length in args.lengths:
        rng = np.random.default_rng(length)
        q = jnp.asarray(rng.normal(size=(args.rows, length, HEADS, HEAD_DIM)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(args.rows, length, KV_HEADS, HEAD_DIM)), jnp.float32)
        v = jnp.asarray(rng.normal(size=(args.rows, length, KV_HEADS, HEAD_DIM)), jnp.float32)
        valid = jnp.ones((args.rows, length), bool)

        def fwd_bwd(impl: str):
            def f(q, k, v):
                return jnp.sum(jnp.sin(causal_attention(q, k, v, valid, None, impl)))

            return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

        fns = {i: fwd_bwd(i) for i in impls}
        outs = {i: jax.block_until_ready(fn(q, k, v)) for i, fn in fns.items()}  # compile + reference values
        diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for i in impls[1:]
                   for a, b in zip(jax.tree.leaves(outs[i]), jax.tree.leaves(outs["einsum"])))  # fmt: skip
        times: dict[str, list[float]] = {i: [] for i in impls}
        for _ in range(args.reps):
            for i, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                times[i].append(time.perf_counter() - t0)
        ms = {i: statistics.median(t) * 1e3 for i, t in times.items()}
        print(f"| {length} | " + " | ".join(f"{ms[i]:.1f}" for i in impls) + " | "
              + " | ".join(f"{ms['einsum'] / ms[i]:.2f}x" for i in impls[1:]) + f" | {diff:.1e} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
