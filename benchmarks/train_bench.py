"""DPO train-step throughput: shared-prompt pair rows vs separate rows vs TRL DPOTrainer, and DPO+CBD vs DPO.

Same model for all rows: random tiny Llama (4 layers, hidden 256, MLP 688, 8 heads, 4 KV heads, vocab
512), 8 pairs per step, fp32, CPU, reference model in memory (in-step forward), ``scan_layers: false``,
``model.attention: auto`` (the pod configs' setting: ``blocked`` on CPU, as TRL's SDPA skips the keys
after each query block too).
Two length settings (``--settings``): prompt 512 + response 128 (sharing the prompt saves 40% of the
tokens) and prompt 64 + response 64 (25%). Per setting, measured interleaved (one step of each row per
round, so load changes on a shared machine hit all rows alike):
  ours DPO, shared_prompt   one row [prompt | chosen | rejected] per pair (``data.pair_layout``)
  ours DPO+CBD, shared      + CBD (a) per-token BCI on ~10% of response tokens, (b) a veto table of 2,000
                            random spans (lengths 4-8, ~5,000 contexts x up to 16 entries) at every position
  ours DPO, separate        two rows per pair (prompt computed twice): the unshared reference layout
  TRL DPOTrainer            torch, fp32, no gradient checkpointing, same model / batch / lengths; only
                            when ``trl`` imports (timed by a ``TrainerCallback``; ours run between its steps)
"tokens/pair" is what the forward actually computes per pair (row length x rows / pairs: padding
included); "GFLOP/step" is XLA's own cost analysis of the compiled step (``--no-cost`` skips it).

    .venv/bin/python benchmarks/train_bench.py [--steps 10] [--settings 512+128 64+64] [--no-trl]
    .venv/bin/python benchmarks/train_bench.py --padding   # padding fraction of both layouts, no model
    .venv/bin/python benchmarks/train_bench.py --profile --steps 3   # op time per model part of our steps
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import numpy as np

ARCH = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False)  # fmt: skip
PAIRS = 8


def toy_pairs(prompt: int, response: int, seed: int = 0, pairs: int = PAIRS, vocab: int = ARCH["vocab_size"]):
    """``pairs`` random pairs with a ``prompt``-token prompt and two ``response``-token responses."""
    from tracealign_jax.pairs import TokenizedPairs

    rng = np.random.default_rng(seed)
    arrays = {}
    for field, n in (("prompt", prompt), ("chosen", response), ("rejected", response)):
        arrays[f"{field}_tokens"] = rng.integers(3, vocab, size=pairs * n).astype(np.int32)
        arrays[f"{field}_offsets"] = np.arange(0, pairs * n + 1, n, dtype=np.int64)
    return TokenizedPairs(arrays)


def host_batch(prompt: int, response: int, layout: str, pairs: int = PAIRS, vocab: int = ARCH["vocab_size"]) -> dict[str, np.ndarray]:
    """The step's batch in ``layout`` (``training.data.build_batch``) with random BCI on ~10% of responses."""
    from tracealign_jax.training.data import build_batch, row_length

    batch = build_batch(toy_pairs(prompt, response, pairs=pairs, vocab=vocab), np.arange(pairs),
                        row_length(prompt + response, layout, response), layout=layout)  # fmt: skip
    rng = np.random.default_rng(1)
    shape = batch["tokens"].shape
    batch["bci"] = (np.where(rng.random(shape) < 0.1, rng.uniform(5, 40, shape), 0.0) * batch["loss_mask"]).astype(np.float32)
    return batch


@dataclasses.dataclass(frozen=True)
class OurStep:
    """One of our jitted steps, ready to run: ``run()`` takes one synchronous step; ``compile()`` returns
    the executable ``run`` calls (for its HLO); tokens computed per pair; XLA's GFLOP/step (or nan)."""

    run: Callable[[], None]
    compile: Callable[[], Any]
    tokens_per_pair: float
    gflop: float
    cfg: Any  # the step's Config
    rows_x_length: tuple[int, int]  # the batch's token array shape


def make_ours(prompt: int, response: int, layout: str, cbd: bool, cost: bool, *, arch: dict = ARCH, pairs: int = PAIRS,
              model: dict | None = None, loss: dict | None = None) -> OurStep:  # fmt: skip
    """Our jitted DPO or DPO+CBD step on ``host_batch`` (``OurStep``); ``model`` / ``loss``: config
    entries over this benchmark's (fp32, unrolled layers, ``attention: auto``; sigmoid DPO, in-step
    reference)."""
    import jax
    import jax.numpy as jnp

    from tracealign_jax import sharding
    from tracealign_jax.config import Config, MeshConfig, from_dict
    from tracealign_jax.training.loop import to_device_batch
    from tracealign_jax.training.state import graphdef_and_abstract_params, init_train_state, state_shardings
    from tracealign_jax.training.step import batch_fields, batch_shardings, make_train_step

    loss = {"type": "sigmoid", "beta": 0.1, **(loss or {})}
    veto = None
    if cbd:
        from tracealign_jax.veto.store import compile_veto_table

        rng = np.random.default_rng(1)
        spans = [(rng.integers(3, arch["vocab_size"], size=int(rng.integers(4, 9))).tolist(), float(rng.uniform(5, 40)))
                 for _ in range(2000)]  # fmt: skip
        veto = jax.tree.map(jnp.asarray, compile_veto_table(spans, max_span=8, max_entries=16))
        loss.update(cbd_data_weight=0.1, cbd_cont_weight=0.1, cbd_margin=1.0, cbd_bci_scale=20.0)
    model = {"arch": arch, "scan_layers": False, "attention": "auto", **(model or {})}
    cfg = from_dict(Config, {"model": model, "mesh": {"data": 1}, "loss": loss,
                             "data": {"pair_layout": layout, "max_prompt_len": prompt, "max_response_len": response,
                                      "buckets": [prompt + response]},
                             "train": {"batch_size": pairs, "learning_rate": 1e-5, "steps": 1000}})  # fmt: skip
    mesh = sharding.build_mesh(MeshConfig(data=1), jax.devices()[:1])
    rules = sharding.resolve_rules(cfg.mesh.rules)
    graphdef, state = init_train_state(cfg, mesh, rules)
    _, abs_params = graphdef_and_abstract_params(cfg, mesh, rules)
    fn = make_train_step(cfg, graphdef, mesh, rules, state_shardings(cfg, abs_params, mesh, rules))
    hb = host_batch(prompt, response, layout, pairs, arch["vocab_size"])
    if cfg.loss.reference == "precomputed":  # any stand-in log-probs: the cost does not depend on them
        hb["ref_logps"] = np.zeros(hb["tokens"].shape, np.float32)
    batch = to_device_batch({k: hb[k] for k in batch_fields(cfg)}, batch_shardings(cfg, mesh, rules))
    gflop = float("nan")
    if cost:
        analysis = fn.lower(state, batch, veto).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        gflop = float(analysis.get("flops", float("nan"))) / 1e9
    box = [state]

    def one() -> None:
        box[0], m = fn(box[0], batch, veto)
        jax.block_until_ready((box[0].params, m))

    return OurStep(one, lambda: fn.lower(box[0], batch, veto).compile(), hb["tokens"].size / pairs, gflop, cfg,
                   hb["tokens"].shape)  # fmt: skip


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


ROWS = (("ours DPO, shared_prompt", "shared_prompt", False), ("ours DPO+CBD (a+b), shared_prompt", "shared_prompt", True),
        ("ours DPO, separate (unshared)", "separate", False))  # fmt: skip


def ours_rows(prompt: int, response: int, warmup: int, cost: bool):
    """Compiled, warmed-up steps of ROWS; a function timing one step of each; their per-row timings."""
    runs = [make_ours(prompt, response, layout, cbd, cost) for _, layout, cbd in ROWS]
    for _ in range(warmup):
        for run in runs:
            run.run()
    times: list[list[tuple[float, float]]] = [[] for _ in ROWS]

    def one_each() -> None:
        for run, t in zip(runs, times):
            t.append(timed(run.run))

    return one_each, times, runs


def bench_trl(prompt: int, response: int, steps: int, warmup: int, between) -> list[tuple[float, float]]:
    """TRL DPOTrainer step times (no gradient checkpointing, like ours); ``between()`` runs after each
    timed step past the warm-up."""
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
    pairs = toy_pairs(prompt, response)
    words = lambda ids: " ".join(f"t{int(i)}" for i in ids)  # noqa: E731  one word = one token
    rows = [{"prompt": words(pairs.get("prompt", i)),
             "chosen": " " + words(pairs.get("chosen", i)[:-1]),  # + EOS (added by TRL) = `response` tokens
             "rejected": " " + words(pairs.get("rejected", i)[:-1])} for i in range(PAIRS)]  # fmt: skip
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
                         beta=0.1, max_length=prompt + response, report_to="none", save_strategy="no", logging_steps=1000,
                         use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, disable_tqdm=True,
                         gradient_checkpointing=False)  # fmt: skip
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tokenizer, callbacks=[Timer()])
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["input_ids"].shape == (2 * PAIRS, prompt + response), batch["input_ids"].shape
        trainer.train()
    return times[warmup:]


def padding_report(n: int = 20000, seed: int = 0, batch_size: int = 16) -> None:
    """Slots computed per pair and the padding fraction of both layouts under bucketing, on a synthetic
    length distribution shaped like public preference sets (log-normal prompt, median 120 tokens; responses
    median 200, sigma 0.8; truncated at 1024 / 1024; buckets 256 / 512 / 1024 / 2048), batched as the
    training loop batches them (``BatchStream``: the same pairs together in both layouts; a shared row
    pads to the shortest row holding its batch's longest pair). No model runs."""
    from types import SimpleNamespace

    from tracealign_jax.training.data import assign_buckets, epoch_batches, row_length_of

    rng = np.random.default_rng(seed)
    ln = lambda med, sigma: np.clip(np.round(rng.lognormal(np.log(med), sigma, n)), 1, 1024).astype(int)  # noqa: E731
    p, c, r = ln(120, 0.9), ln(200, 0.8), ln(200, 0.8)
    lengths = {"prompt": p, "chosen": c, "rejected": r}
    pairs = SimpleNamespace(lengths=lambda field: lengths[field])
    buckets = (256, 512, 1024, 2048)
    bucket_N = assign_buckets(pairs, buckets)
    batches = epoch_batches(bucket_N, batch_size, seed, 0)
    unique = p + c + r
    print(f"\npadding on {n:,} synthetic pairs in batches of {batch_size} (prompt median {np.median(p):.0f}, "
          f"responses {np.median(c):.0f}; buckets {list(buckets)})")
    print(f"{'layout':16s} {'slots/pair':>10s} {'padding':>8s} {'slots / unique tokens':>22s}")
    for layout, rows in (("separate", 2), ("shared_prompt", 1)):
        slots = real = held = 0
        for idx in batches:
            slots += rows * len(idx) * row_length_of(pairs, idx, int(bucket_N[idx[0]]), layout, buckets, 1024)
            real += int(unique[idx].sum() + (p[idx].sum() if layout == "separate" else 0))  # separate: prompt twice
            held += int(unique[idx].sum())
        pairs_seen = sum(len(idx) for idx in batches)
        print(f"{layout:16s} {slots / pairs_seen:10.0f} {1 - real / slots:8.1%} {slots / held:22.2f}")


def profile_report(prompt: int, response: int, warmup: int, steps: int) -> None:
    """Op time of each of our ROWS per model part, forward + backward (``tracealign_jax.step_profile``)."""
    from tracealign_jax.step_profile import markdown_table, profile_call

    profiles = {}
    for name, layout, cbd in ROWS:
        run = make_ours(prompt, response, layout, cbd, cost=False)
        for _ in range(max(warmup, 1)):
            run.run()
        profiles[name.removeprefix("ours ")] = profile_call(run.compile(), run.run, calls=steps)
    print(f"\nwhere the time goes: prompt {prompt} + response {response}, {PAIRS} pairs/step, op time per step "
          f"over {steps} profiled steps (ops overlap on the CPU's threads, so the sum exceeds the wall time)")
    print(markdown_table(profiles))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=["512+128", "64+64"], help="prompt+response token lengths")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL even if it imports")
    ap.add_argument("--no-cost", action="store_true", help="skip XLA's cost analysis (one more compile per row)")
    ap.add_argument("--padding", action="store_true", help="only the padding table (no model)")
    ap.add_argument("--profile", action="store_true", help="only where our steps' time goes, per model part (no TRL)")
    args = ap.parse_args()
    if args.padding:
        padding_report()
        return
    if args.profile:
        for setting in args.settings:
            profile_report(*(int(x) for x in setting.split("+")), args.warmup, args.steps)
        return
    med = lambda ts, k: statistics.median(t[k] for t in ts)  # noqa: E731
    for setting in args.settings:
        prompt, response = (int(x) for x in setting.split("+"))
        one_each, times, runs = ours_rows(prompt, response, args.warmup, not args.no_cost)
        trl, note = None, ""
        if not args.no_trl:
            try:
                trl = bench_trl(prompt, response, args.steps, args.warmup, one_each)
            except ImportError as err:
                note = f"TRL is not importable here ({err}): the unshared row stands in as the baseline."
        while len(times[0]) < args.steps:
            one_each()
        rows = [(name, med(t, 0), med(t, 1), run.tokens_per_pair, run.gflop) for (name, _, _), t, run in zip(ROWS, times, runs)]
        if trl is not None:
            rows.append(("TRL DPOTrainer (torch, no grad. checkpoint.)", med(trl, 0), med(trl, 1), 2.0 * (prompt + response),
                         float("nan")))  # fmt: skip
        print(f"\nprompt {prompt} + response {response}, {PAIRS} pairs/step, {args.steps} interleaved steps")
        print(f"{'run':46s} {'tokens/pair':>11s} {'GFLOP/step':>10s} {'median wall ms':>14s} {'CPU-s/step':>10s}")
        for name, wall, cpu, per, gflop in rows:
            print(f"{name:46s} {per:11.0f} {gflop:10.1f} {wall * 1e3:14.1f} {cpu:10.2f}")
        base = rows[-1]
        try:
            load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        except OSError:
            load = ""
        print(f"CBD overhead vs DPO (shared): wall {100 * (rows[1][1] / rows[0][1] - 1):+.1f}%, "
              f"CPU {100 * (rows[1][2] / rows[0][2] - 1):+.1f}%  |  {base[0]} / ours shared: wall "
              f"{base[1] / rows[0][1]:.2f}x, CPU {base[2] / rows[0][2]:.2f}x, tokens {base[3] / rows[0][3]:.2f}x  ({load})")  # fmt: skip
        if note:
            print(note)


if __name__ == "__main__":
    main()
