"""TRACE step on LoRA adapters vs the same objective on all parameters: time and memory, same run.

Model and batch are train_bench's (random Llama: 4 layers, hidden 256, MLP 688, 8 heads, 4 KV heads,
vocab 512; 8 pairs, prompt 64 + response 64 tokens; fp32, CPU, one device). Both steps compute the
TRACE objective (pairs alternate invert / suppress / retain; beta 0.3, alpha_KL 0.1) with a
reference forward in the step, clip + AdamW:
  * LoRA: ``realign.step.trace_lora_step`` (rank ``--rank`` on all 7 projections; reference = the
    base with B = 0; gradients and optimizer moments for the adapters only);
  * full: the same loss differentiated with respect to every parameter, the reference a frozen copy.
Time: median wall ms over ``--steps`` steps after one compile step, the two interleaved. Memory:
optimizer-state bytes (from the state trees) and XLA's accounting of each compiled step
(``memory_analysis``: arguments + outputs + temporaries, minus aliased donated buffers).

    .venv/bin/python benchmarks/lora_bench.py [--steps 10] [--rank 8]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import ARCH, PAIRS, PROMPT, RESPONSE, host_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from tracealign_jax import sharding
    from tracealign_jax.config import LoRAConfig, MeshConfig, RealignConfig, TrainConfig
    from tracealign_jax.model import ModelArch, init_model
    from tracealign_jax.model import lora as L
    from tracealign_jax.realign.objective import chunked_token_kl, trace_objective
    from tracealign_jax.realign.step import init_lora_state, make_trace_lora_step
    from tracealign_jax.training.logprobs import chunked_token_logprobs
    from tracealign_jax.training.state import make_optimizer

    arch = ModelArch.from_hf_dict(ARCH)
    rc, tc = RealignConfig(), TrainConfig(learning_rate=1e-5, steps=1000)
    hb = host_batch()
    cats = np.resize(np.array([1, 2, 0], np.int32), PAIRS)
    batch = {k: jnp.asarray(hb[k]) for k in ("tokens", "positions", "valid", "loss_mask")}
    batch |= {"category": jnp.asarray(cats), "weight": jnp.asarray((cats != 0).astype(np.float32))}
    mesh = sharding.build_mesh(MeshConfig(data=1), jax.devices()[:1])
    rules = sharding.RULE_PRESETS["fsdp_tp"]

    # LoRA
    model = L.add_lora(init_model(arch, scan_layers=False, seed=0), LoRAConfig(rank=args.rank, alpha=2.0 * args.rank))
    graphdef, adapter, base = L.split_adapter(model)
    lora_fn, st_sh, b_sh, batch_sh = make_trace_lora_step(graphdef, adapter, base, mesh, rules, rc=rc, tc=tc, dropout=False)
    lora_state = jax.device_put(init_lora_state(adapter, tc), st_sh)
    base = jax.device_put(base, b_sh)
    lora_batch = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}

    # full parameters, same objective
    fgraph, params = nnx.split(init_model(arch, scan_layers=False, seed=0))
    ref = jax.tree.map(jnp.copy, params)
    opt = make_optimizer(tc)

    def full_loss(p, ref_p, b):
        m, mr = nnx.merge(fgraph, p), nnx.merge(fgraph, ref_p)
        h, _ = m.hidden(b["tokens"], b["positions"], b["valid"])
        hr, _ = mr.hidden(b["tokens"], b["positions"], b["valid"])
        hr, wr = jax.lax.stop_gradient(hr), jax.lax.stop_gradient(mr.unembedding_matrix())
        lp, _ = chunked_token_logprobs(h, m.unembedding_matrix(), b["tokens"])
        lr, _ = chunked_token_logprobs(hr, wr, b["tokens"])
        kl = chunked_token_kl(h, m.unembedding_matrix(), hr, wr)
        mask = b["loss_mask"]
        return trace_objective(jnp.sum(lp * mask, -1), jnp.sum(lr * mask, -1), kl, mask, b["category"], b["weight"],
                               beta=rc.beta, alpha_kl=rc.alpha_kl)[0]  # fmt: skip

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def full_step(p, opt_state, ref_p, b):
        loss, g = jax.value_and_grad(full_loss)(p, ref_p, b)
        updates, opt_state = opt.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    full_state = [params, opt.init(params)]
    lora_box = [lora_state]

    def run_lora():
        lora_box[0], m = lora_fn(lora_box[0], base, lora_batch)
        jax.block_until_ready(m)

    def run_full():
        full_state[0], full_state[1], loss = full_step(full_state[0], full_state[1], ref, batch)
        jax.block_until_ready(loss)

    def xla_mib(compiled) -> float:
        m = compiled.memory_analysis()
        if m is None:
            return float("nan")
        return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**20

    mem_lora = xla_mib(lora_fn.lower(lora_box[0], base, lora_batch).compile())
    mem_full = xla_mib(full_step.lower(full_state[0], full_state[1], ref, batch).compile())
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    opt_lora, opt_full = nbytes(lora_box[0].opt_state), nbytes(full_state[1])
    n_adapter, n_params = sum(x.size for x in jax.tree.leaves(adapter)), sum(x.size for x in jax.tree.leaves(params))
    run_lora()
    run_full()
    t_lora, t_full = [], []
    for _ in range(args.steps):
        for fn, ts in ((run_lora, t_lora), (run_full, t_full)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    tokens = 2 * PAIRS * (PROMPT + RESPONSE)
    print(f"model {n_params / 1e6:.2f} M parameters; LoRA rank {args.rank} on 7 projections: {n_adapter / 1e6:.3f} M "
          f"trainable ({100 * n_adapter / n_params:.2f}%); {tokens} tokens per step; backend {jax.default_backend()}")
    print("| step | median ms | tokens/s | optimizer state MiB | XLA step memory MiB |")
    print("|---|---|---|---|---|")
    for name, ts, o, mem in (("TRACE, LoRA adapters", t_lora, opt_lora, mem_lora), ("TRACE, all parameters", t_full, opt_full, mem_full)):
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} | {tokens / med:.0f} | {o / 2**20:.2f} | {mem:.1f} |")
    try:
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    except OSError:
        pass


if __name__ == "__main__":
    main()
