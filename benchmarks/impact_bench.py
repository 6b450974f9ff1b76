"""Impact scores <g_J, g_i>: one forward-mode JVP (ours) vs explicit per-example gradients (vmap(grad)).

Same run for all rows: a random Llama (default 4 layers, hidden 256, MLP 688, 8 heads, 4 KV heads,
vocab 512: train_bench's model), fp32, CPU, prompt 32 + response 32 tokens, every pair a conflict
(half inverted, half suppressed), g_J from one retained batch. For each pair count N both functions
score the same N pairs in one batch; time is the median of ``--reps`` calls after a compile call;
memory is XLA's own accounting of the compiled executable (``memory_analysis``: temporaries +
outputs, the arguments, shared by both, excluded), which is exact on any backend. Per row: the
largest difference between the two score vectors relative to the largest score, and the largest
elementwise relative difference (large only for scores near 0, where float32 cancellation in
either path dominates).

    .venv/bin/python benchmarks/impact_bench.py [--pairs 4 8 16 32] [--reps 3] [--layers 4 --hidden 256]

``realign.impact.impact_scores`` runs fixed-size batches, so its memory is one row's "ours" memory
whatever the number of pairs; vmap(grad) holds N x |theta| gradient floats at once.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

PROMPT, RESPONSE = 32, 32


def batch(n: int, vocab: int, categories: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, length = 2 * n, PROMPT + RESPONSE
    tokens = rng.integers(3, vocab, size=(rows, length)).astype(np.int32)
    tokens[1::2, :PROMPT] = tokens[0::2, :PROMPT]
    mask = np.zeros((rows, length), np.float32)
    mask[:, PROMPT:] = 1.0
    return {"tokens": tokens, "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
            "valid": np.ones((rows, length), bool), "loss_mask": mask, "category": np.asarray(categories, np.int32)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()

    import jax
    from flax import nnx

    from tracealign_jax.model import ModelArch, init_model
    from tracealign_jax.realign import impact
    from tracealign_jax.realign.triage import INVERT, RETAIN, SUPPRESS

    arch = ModelArch.from_hf_dict(dict(
        model_type="llama", vocab_size=512, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
    ))  # fmt: skip
    graphdef, params = nnx.split(init_model(arch, seed=0, scan_layers=False))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    gold = {k: jax.numpy.asarray(v) for k, v in batch(8, arch.vocab_size, [RETAIN] * 8, seed=99).items()}
    g_j = impact.gold_gradient(graphdef, params, [gold], beta=0.3)
    kw = dict(graphdef=graphdef, beta=0.3, invert_loss="logistic")
    print(f"model: {args.layers} layers, hidden {args.hidden}, {n_params / 1e6:.2f} M parameters; "
          f"{PROMPT}+{RESPONSE} tokens per response; backend {jax.default_backend()}, {jax.device_count()} device(s)")
    print("| pairs | ours (JVP) ms | ours MiB | vmap(grad) ms | vmap(grad) MiB | speed-up | memory ratio "
          "| max abs diff / max abs score | max elementwise rel diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.pairs:
        cats = [INVERT if i % 2 == 0 else SUPPRESS for i in range(n)]
        b = {k: jax.numpy.asarray(v) for k, v in batch(n, arch.vocab_size, cats, seed=n).items()}
        row = {}
        for name, fn in (("jvp", impact.conflict_scores), ("vmap", impact.explicit_conflict_scores)):
            compiled = fn.lower(params, b, g_j, **kw).compile()
            mem = compiled.memory_analysis()
            mib = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20 if mem is not None else float("nan")
            out = np.asarray(compiled(params, b, g_j))
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(params, b, g_j))
                times.append(time.perf_counter() - t0)
            row[name] = (statistics.median(times) * 1e3, mib, out)
        (tj, mj, sj), (tv, mv, sv) = row["jvp"], row["vmap"]
        scale = float(np.max(np.abs(sj - sv)) / np.max(np.abs(sv)))
        rel = float(np.max(np.abs(sj - sv) / np.maximum(np.abs(sv), 1e-30)))
        print(f"| {n} | {tj:.1f} | {mj:.1f} | {tv:.1f} | {mv:.1f} | {tv / tj:.2f}x | {mv / mj:.1f}x | {scale:.1e} | {rel:.1e} |")


if __name__ == "__main__":
    main()
