"""Impact scores <g_J, g_i>: ours (one forward-mode JVP) vs explicit per-example gradients (vmap(grad)).

Same run for every row: a random Llama (default 4 layers, hidden 256, MLP 688, 8 heads, 4 KV heads,
vocab 32,000 as Llama-2's), fp32, CPU, one ``--attention`` for every function (default auto: blocked
on CPU); every pair a conflict (half inverted, half suppressed); g_J from one retained batch. For each length setting (prompt + response tokens) and pair count N, three
functions score the same N pairs in one batch:

  explicit   ``vmap(grad)`` of the per-pair loss: every g_i materialised, then dotted with g_J; rows
             ``[prompt | y]`` twice per pair, every position unembedded (how per-example gradients are
             usually computed, and ``impact.explicit_conflict_scores``, the tests' reference)
  jvp        one JVP of the per-pair losses along g_J on those same rows (isolates forward mode)
  ours       what ``tracealign realign impact`` runs: the JVP on shared-prompt rows
             ``[prompt | y_w | y_l]`` (the prompt computed once), logits only on response tokens

Time: median of ``--reps`` calls after a compile call. Memory: XLA's own accounting of each compiled
executable (``memory_analysis``: temporaries + outputs; the shared arguments excluded), exact on any
backend. FLOPs: the matmul FLOPs of each compiled program (``aot.hlo_report.hlo_costs``: every dot,
loop bodies counted per trip), so "FLOP ratio" is how much faster ours would be if time followed
matmul FLOPs. Per row: the largest difference of ours from explicit relative to the largest score.

    .venv/bin/python benchmarks/impact_bench.py [--settings 32+32 512+128] [--pairs 4 8] [--reps 3]

``realign.impact.impact_scores`` runs fixed-size batches, so its memory is one row's "ours" memory
whatever the number of pairs; vmap(grad) holds N x |theta| gradient floats at once.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def pair_batches(n: int, prompt: int, response: int, vocab: int, categories: list[int], seed: int) -> dict[str, dict]:
    """The same n random pairs (prompt + two responses of exactly these lengths) in both layouts."""
    import jax.numpy as jnp

    from tracealign_jax.training.data import build_batch, row_length

    rng = np.random.default_rng(seed)
    ids = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        ids["prompt"].append(rng.integers(3, vocab, size=prompt).astype(np.int32))
        for field in ("chosen", "rejected"):
            ids[field].append(rng.integers(3, vocab, size=response).astype(np.int32))

    class Pairs:
        get = staticmethod(lambda field, i: ids[field][i])

    out = {}
    for layout in ("separate", "shared_prompt"):
        host = build_batch(Pairs, np.arange(n), row_length(prompt + response, layout, response), layout=layout)
        out[layout] = {k: jnp.asarray(v) for k, v in host.items() if k not in ("index", "bci")}
        out[layout]["category"] = jnp.asarray(categories, jnp.int32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["32+32", "512+128"], help="prompt+response token lengths")
    ap.add_argument("--pairs", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--attention", default="auto", help="model.attention of every function (auto: blocked on CPU)")
    args = ap.parse_args()

    import jax
    from flax import nnx

    from tracealign_jax.aot.hlo_report import hlo_costs
    from tracealign_jax.model import ModelArch, init_model
    from tracealign_jax.realign import impact
    from tracealign_jax.realign.triage import INVERT, RETAIN, SUPPRESS

    longest = max(sum(int(x) for x in s.split("+")) for s in args.settings)
    arch = ModelArch.from_hf_dict(dict(
        model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2 * longest,
    ))  # fmt: skip
    graphdef, params = nnx.split(init_model(arch, seed=0, scan_layers=False))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    kw = dict(graphdef=graphdef, beta=0.3, invert_loss="logistic", attention=args.attention)
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {n_params / 1e6:.2f} M parameters; "
          f"attention {args.attention}; backend {jax.default_backend()}, {jax.device_count()} device(s)")
    print("| prompt+response | pairs | explicit vmap(grad) ms / MiB | jvp, same rows ms / MiB | ours ms / MiB "
          "| ours vs explicit: speed / memory / matmul FLOP ratio | jvp vs explicit: speed | max abs diff / max abs score |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in args.settings:
        prompt, response = (int(x) for x in setting.split("+"))
        gold = pair_batches(8, prompt, response, args.vocab, [RETAIN] * 8, seed=99)["separate"]
        g_j = impact.gold_gradient(graphdef, params, [gold], beta=0.3, attention=args.attention)
        for n in args.pairs:
            cats = [INVERT if i % 2 == 0 else SUPPRESS for i in range(n)]
            b = pair_batches(n, prompt, response, args.vocab, cats, seed=n)
            runs = {"explicit": (impact.explicit_conflict_scores, b["separate"], {}),
                    "jvp": (impact.conflict_scores, b["separate"], {}),
                    "ours": (impact.conflict_scores, b["shared_prompt"], {"response_len": 2 * response})}  # fmt: skip
            compiled, out, times = {}, {}, {k: [] for k in runs}
            for name, (fn, batch, extra) in runs.items():
                compiled[name] = fn.lower(params, batch, g_j, **kw, **extra).compile()
                out[name] = np.asarray(compiled[name](params, batch, g_j))
            for _ in range(args.reps):  # interleaved, so load drifts hit every function alike
                for name, (_, batch, _) in runs.items():
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled[name](params, batch, g_j))
                    times[name].append(time.perf_counter() - t0)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            mib, flops = {}, {}
            for k, c in compiled.items():
                mem = c.memory_analysis()
                mib[k] = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20 if mem is not None else float("nan")
                flops[k] = hlo_costs(c.as_text()).matmul_flops
            diff = float(np.max(np.abs(out["ours"] - out["explicit"])) / np.max(np.abs(out["explicit"])))
            print(f"| {setting} | {n} | {ms['explicit']:.0f} / {mib['explicit']:.0f} | {ms['jvp']:.0f} / {mib['jvp']:.0f} "
                  f"| {ms['ours']:.0f} / {mib['ours']:.0f} | {ms['explicit'] / ms['ours']:.2f}x / {mib['explicit'] / mib['ours']:.1f}x "
                  f"/ {flops['explicit'] / flops['ours']:.2f}x "
                  f"| {ms['explicit'] / ms['jvp']:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
