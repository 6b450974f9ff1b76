"""DPO train-step throughput: ours (JAX, jitted) vs TRL DPOTrainer (PyTorch), and DPO+CBD vs plain DPO.

Same run for all rows: random tiny Llama (4 layers, hidden 256, MLP 688, 8 heads, 4 KV heads, vocab
512), 8 pairs per step, prompt 64 + response 64 tokens, fp32, CPU, reference model in memory (in-step
forward). Throughput counts chosen + rejected tokens (2 x 8 x 128 per step); the median step time
is over ``--steps`` steps after ``--warmup`` (compile) steps. Our model runs with
``model.scan_layers: false`` (the 4 layers unrolled, as one would configure a model this shallow).

The three rows are measured interleaved: after every TRL step (timed by a ``TrainerCallback``)
one DPO and one DPO+CBD step of ours run, so load changes on a shared machine hit all rows alike.
TRL runs twice: without gradient checkpointing (like ours: the like-for-like row the target is
judged on) and with its DPOConfig default ``gradient_checkpointing=True`` (how users get it).

    .venv/bin/python benchmarks/train_bench.py [--steps 10] [--no-trl]

DPO+CBD uses both terms: (a) per-token BCI on ~10% of response tokens, (b) a veto table of 2,000
random spans (lengths 4-8, so ~5,000 contexts x up to 16 entries) looked up at every position.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

ARCH = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False)  # fmt: skip
PAIRS, PROMPT, RESPONSE = 8, 64, 64


def host_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, length = 2 * PAIRS, PROMPT + RESPONSE
    tokens = rng.integers(3, ARCH["vocab_size"], size=(rows, length)).astype(np.int32)
    tokens[1::2, :PROMPT] = tokens[0::2, :PROMPT]  # a pair shares its prompt
    mask = np.zeros((rows, length), np.float32)
    mask[:, PROMPT:] = 1.0
    bci = np.where(rng.random((rows, length)) < 0.1, rng.uniform(5, 40, (rows, length)), 0.0).astype(np.float32) * mask
    return {"tokens": tokens, "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
            "valid": np.ones((rows, length), bool), "loss_mask": mask, "bci": bci}  # fmt: skip


def make_ours(cbd: bool):
    """A zero-argument callable running one synchronous step of our jitted DPO (or DPO+CBD) step."""
    import jax
    import jax.numpy as jnp

    from tracealign_jax import sharding
    from tracealign_jax.config import MeshConfig, from_dict, Config
    from tracealign_jax.training.loop import to_device_batch
    from tracealign_jax.training.state import graphdef_and_abstract_params, init_train_state, state_shardings
    from tracealign_jax.training.step import batch_fields, batch_shardings, make_train_step

    loss = {"type": "sigmoid", "beta": 0.1}
    veto = None
    if cbd:
        from tracealign_jax.veto.store import compile_veto_table

        rng = np.random.default_rng(1)
        spans = [(rng.integers(3, ARCH["vocab_size"], size=int(rng.integers(4, 9))).tolist(), float(rng.uniform(5, 40)))
                 for _ in range(2000)]  # fmt: skip
        veto = jax.tree.map(jnp.asarray, compile_veto_table(spans, max_span=8, max_entries=16))
        loss.update(cbd_data_weight=0.1, cbd_cont_weight=0.1, cbd_margin=1.0, cbd_bci_scale=20.0)
    cfg = from_dict(Config, {"model": {"arch": ARCH, "scan_layers": False}, "mesh": {"data": 1}, "loss": loss,
                             "train": {"batch_size": PAIRS, "learning_rate": 1e-5, "steps": 1000}})  # fmt: skip
    mesh = sharding.build_mesh(MeshConfig(data=1), jax.devices()[:1])
    rules = sharding.resolve_rules(cfg.mesh.rules)
    graphdef, state = init_train_state(cfg, mesh, rules)
    _, abs_params = graphdef_and_abstract_params(cfg, mesh, rules)
    fn = make_train_step(cfg, graphdef, mesh, rules, state_shardings(cfg, abs_params, mesh, rules))
    hb = host_batch()
    batch = to_device_batch({k: hb[k] for k in batch_fields(cfg)}, batch_shardings(cfg, mesh, rules))
    box = [state]

    def one() -> None:
        box[0], m = fn(box[0], batch, veto)
        jax.block_until_ready((box[0].params, m))

    return one


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def ours_pair(warmup: int):
    """Compiled and warmed-up plain DPO and DPO+CBD steps, and a function timing one of each."""
    dpo, cbd = make_ours(False), make_ours(True)
    for _ in range(warmup):
        dpo()
        cbd()
    t_dpo: list[tuple[float, float]] = []
    t_cbd: list[tuple[float, float]] = []

    def one_each() -> None:
        t_dpo.append(timed(dpo))
        t_cbd.append(timed(cbd))

    return one_each, t_dpo, t_cbd


def bench_trl(steps: int, warmup: int, between, checkpointing: bool) -> list[tuple[float, float]]:
    """TRL DPOTrainer step times; ``between()`` runs after each timed step past the warm-up.
    checkpointing: TRL's ``gradient_checkpointing`` (its DPOConfig default is True)."""
    import copy
    import tempfile

    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, ARCH["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    hb = host_batch()
    words = lambda ids: " ".join(f"t{int(i)}" for i in ids)  # noqa: E731  one word = one token
    rows = [{"prompt": words(hb["tokens"][2 * i, :PROMPT]),
             "chosen": " " + words(hb["tokens"][2 * i, PROMPT:-1]),  # + EOS (added by TRL) = 64 tokens
             "rejected": " " + words(hb["tokens"][2 * i + 1, PROMPT:-1])} for i in range(PAIRS)]  # fmt: skip
    data = Dataset.from_list(rows * (warmup + steps + 1))
    arch = {k: v for k, v in ARCH.items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**arch, pad_token_id=0, eos_token_id=1, bos_token_id=None))
    times: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append((time.perf_counter() - self.t, time.process_time() - self.c))
            if len(times) > warmup:
                between()

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=PAIRS, max_steps=warmup + steps, learning_rate=1e-5,
                         beta=0.1, max_length=PROMPT + RESPONSE, report_to="none", save_strategy="no", logging_steps=1000,
                         use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, disable_tqdm=True,
                         gradient_checkpointing=checkpointing)  # fmt: skip
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tokenizer, callbacks=[Timer()])
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["input_ids"].shape == (2 * PAIRS, PROMPT + RESPONSE), batch["input_ids"].shape
        trainer.train()
    return times[warmup:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-trl", action="store_true", help="skip TRL (use the measured figure from shared/README)")
    args = ap.parse_args()
    tokens = 2 * PAIRS * (PROMPT + RESPONSE)
    med = lambda ts, k: statistics.median(t[k] for t in ts)  # noqa: E731
    one_each, dpo, cbd = ours_pair(args.warmup)
    trl, trl_note = None, ""
    if not args.no_trl:
        try:
            trl = {gc: bench_trl(args.steps, args.warmup, one_each, gc) for gc in (False, True)}
        except Exception as err:  # noqa: BLE001  report and fall back to the measured figure
            trl_note = f"TRL could not run here ({type(err).__name__}: {err}); "
    while len(dpo) < args.steps:  # without TRL (or if it failed part-way)
        one_each()
    rows = [("ours DPO (JAX jit, fp32)", med(dpo, 0), med(dpo, 1)), ("ours DPO+CBD (a+b)", med(cbd, 0), med(cbd, 1))]
    if trl is not None:
        rows.append(("TRL DPOTrainer (torch, fp32, no checkpoint.)", med(trl[False], 0), med(trl[False], 1)))
        rows.append(("TRL DPOTrainer (its default: grad. checkpoint.)", med(trl[True], 0), med(trl[True], 1)))
    if len(rows) == 2:
        rows.append(("TRL DPOTrainer (shared/README measured)", 0.457, float("nan")))
        trl_note += "TRL row is the figure measured on this machine class, not this run."
    try:
        load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        load = ""
    print(f"{'run':48s} {'median wall ms':>14s} {'tokens/s':>9s} {'CPU-s/step':>10s} {'tok/CPU-s':>10s}")
    for name, wall, cpu in rows:
        print(f"{name:48s} {wall * 1e3:14.1f} {tokens / wall:9.0f} {cpu:10.2f} {tokens / cpu:10.0f}")
    print(f"CBD overhead vs plain DPO: wall {100 * (rows[1][1] / rows[0][1] - 1):+.1f}%, CPU {100 * (rows[1][2] / rows[0][2] - 1):+.1f}%"
          f"   |   TRL (no checkpointing, like ours) / ours step time: wall {rows[2][1] / rows[0][1]:.2f}x, "
          f"CPU {rows[2][2] / rows[0][2]:.2f}x   ({load})")  # fmt: skip
    if trl_note:
        print(trl_note)

if __name__ == "__main__":
    main()
