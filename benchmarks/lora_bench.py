"""The train step on LoRA adapters vs on all parameters (the same ``training.step``): time and memory, same run.

Model and batch are train_bench's (random Llama: 4 layers, hidden 256, MLP 688, 8 heads, 4 KV heads,
vocab 512; 8 pairs, prompt 64 + response 64 tokens; fp32, CPU, one device). Rows:
  * DPO, all parameters: the frozen reference a copy in the step (the compute dtype, float32 here);
  * DPO, LoRA: rank ``--rank`` on all 7 projections; the reference is the base (adapters zeroed);
    gradients and optimizer moments for the adapters only;
  * TRACE, LoRA (pairs alternate invert / suppress / retain; beta 0.3, alpha_KL 0.1): the token KL
    over the vocabulary on top of DPO's work.
Time: median wall ms over ``--steps`` steps after one compile step, the rows interleaved. Memory:
optimizer-state bytes (from the state trees) and XLA's accounting of each compiled step
(``memory_analysis``: arguments + outputs + temporaries, minus aliased donated buffers).

    .venv/bin/python benchmarks/lora_bench.py [--steps 10] [--rank 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import ARCH, PAIRS, PROMPT, RESPONSE, host_batch  # noqa: E402


def make_step(loss: str, rank: int):
    """(one synchronous step, optimizer-state bytes, XLA step MiB, trained / total parameter counts)."""
    import jax

    from tracealign_jax import sharding
    from tracealign_jax.config import Config, MeshConfig, from_dict
    from tracealign_jax.training.loop import to_device_batch
    from tracealign_jax.training.state import graphdef_and_abstract_params, init_train_state, state_shardings
    from tracealign_jax.training.step import batch_fields, batch_shardings, make_train_step

    cfg = from_dict(Config, {"model": {"arch": ARCH, "scan_layers": False}, "mesh": {"data": 1},
                             "loss": {"type": loss}, "lora": {"rank": rank, "alpha": 2.0 * max(rank, 1)},
                             "train": {"batch_size": PAIRS, "learning_rate": 1e-5, "steps": 1000}})  # fmt: skip
    mesh = sharding.build_mesh(MeshConfig(data=1), jax.devices()[:1])
    rules = sharding.resolve_rules(cfg.mesh.rules)
    graphdef, state = init_train_state(cfg, mesh, rules)
    _, abs_params = graphdef_and_abstract_params(cfg, mesh, rules)
    fn = make_train_step(cfg, graphdef, mesh, rules, state_shardings(cfg, abs_params, mesh, rules))
    hb = host_batch()
    cats = np.resize(np.array([1, 2, 0], np.int32), PAIRS)
    hb |= {"category": cats, "weight": (cats != 0).astype(np.float32)}
    batch = to_device_batch({k: hb[k] for k in batch_fields(cfg)}, batch_shardings(cfg, mesh, rules))
    m = fn.lower(state, batch, None).compile().memory_analysis()
    mib = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**20
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    opt_bytes, trained = nbytes(state.opt_state), count(state.params)
    total = trained + count(state.frozen)
    box = [state]

    def one() -> None:
        box[0], metrics = fn(box[0], batch, None)
        jax.block_until_ready(metrics)

    return one, opt_bytes, mib, trained, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    import jax

    rows = {"DPO, all parameters": make_step("sigmoid", 0), f"DPO, LoRA r={args.rank}": make_step("sigmoid", args.rank),
            f"TRACE, LoRA r={args.rank}": make_step("trace", args.rank)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in rows}
    for one, *_ in rows.values():
        one()  # compile
    for _ in range(args.steps):
        for name, (one, *_) in rows.items():
            t0 = time.perf_counter()
            one()
            times[name].append(time.perf_counter() - t0)
    tokens = 2 * PAIRS * (PROMPT + RESPONSE)
    print(f"{tokens} tokens per step; backend {jax.default_backend()}")
    print("| step | trained params | median ms | tokens/s | optimizer state MiB | XLA step memory MiB |")
    print("|---|---|---|---|---|---|")
    for name, (_, opt, mib, trained, total) in rows.items():
        med = statistics.median(times[name])
        print(f"| {name} | {trained / 1e6:.3f} M of {total / 1e6:.2f} M | {med * 1e3:.1f} | {tokens / med:.0f} | "
              f"{opt / 2**20:.2f} | {mib:.1f} |")
    try:
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    except OSError:
        pass


if __name__ == "__main__":
    main()
