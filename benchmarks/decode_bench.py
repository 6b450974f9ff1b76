"""Prov-Decode vs the same beam search without the veto vs transformers ``generate`` + a host veto.

One run, one tiny random Llama (vocab 32k by default), the same prompts and the same veto table:

  1. ours, beam search, veto off         (one jitted while_loop)
  2. ours, beam search, hard veto        (Prov-Decode: table lookup by searchsorted inside the loop)
  3. transformers generate(num_beams=K), no processor (reference point)
  4. transformers generate(num_beams=K) + a Python LogitsProcessor that looks the veto table up on
     the host at every step for every beam (the reference implementation's architecture; it does
     one dict probe per suffix length per beam, far fewer than its per-vocabulary-item index calls)

All four run exactly ``max_new_tokens`` steps (EOS can never end a beam: ours gets an EOS id outside
the vocabulary, HF gets ``min_new_tokens = max_new_tokens``), so times compare per step. The veto
table holds random high-BCI spans plus spans the unvetoed search actually produces, so the veto
fires. Times are medians over repeats of one batch, after compilation (reported separately).

    .venv/bin/python benchmarks/decode_bench.py [--vocab 32000 --batch 8 --beams 4 --max-new 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np


def _timed(fn, repeats: int) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds over all threads) per repeat."""
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--spans", type=int, default=50000, help="random high-BCI spans in the veto table")
    ap.add_argument("--span-len", type=int, default=8, help="max span length (context window = span-len - 1)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--hf-repeats", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    from tracealign_jax.config import DecodeConfig
    from tracealign_jax.decoding.runner import Decoder, left_pad
    from tracealign_jax.hf_io import load_hf
    from tracealign_jax.provenance.veto_table import compile_veto_table

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)  # fmt: skip
    hf_model = LlamaForCausalLM(hf_cfg).eval()
    tmp = tempfile.mkdtemp(prefix="decode_bench_")
    hf_model.save_pretrained(tmp)
    model, arch = load_hf(tmp, progress=False)

    rng = np.random.default_rng(0)
    lens = rng.integers(args.span_len, args.prompt_len + 1, size=args.batch)
    prompts = [list(rng.integers(3, args.vocab, size=n)) for n in lens]
    tokens, valid = left_pad(prompts, args.prompt_len, args.batch, 0)
    base = DecodeConfig(method="beam", num_beams=args.beams, max_new_tokens=args.max_new, length_penalty=0.6,
                        prompt_buckets=(args.prompt_len,), batch_size=args.batch)  # fmt: skip
    never_eos = args.vocab + 1  # outside the vocabulary: every search runs max_new steps

    # Veto table: random spans + the spans the unvetoed search emits (prompt tail + first tokens).
    plain = Decoder(model, base, eos_id=never_eos)
    compile_s = {}
    t0 = time.perf_counter()
    first = jax.device_get(plain.decode_batch(tokens, valid))
    compile_s["off"] = time.perf_counter() - t0  # first call: trace + compile + one run
    spans = [(list(rng.integers(3, args.vocab, size=rng.integers(4, args.span_len + 1))), 30.0) for _ in range(args.spans)]
    for row, p in enumerate(prompts):
        gen = [int(t) for t in first.tokens_BxKxT[row, 0, :4]]
        spans.append((p[-(args.span_len - 4) :] + gen, 30.0))
    t0 = time.perf_counter()
    table = jax.tree.map(jax.numpy.asarray, compile_veto_table(spans, max_span=args.span_len, max_entries=16))
    build_s = time.perf_counter() - t0
    c = table.context_len
    host = {}
    for toks, pen in spans:
        for k in range(1, len(toks)):
            slot = host.setdefault(tuple(int(t) for t in toks[:k]), {})
            slot[int(toks[k])] = max(pen, slot.get(int(toks[k]), 0.0))
    vcfg = base.__class__(**{**base.__dict__, "veto": "hard", "tau": 1.0, "min_prefix": 2})
    veto = Decoder(model, vcfg, eos_id=never_eos, veto_table=table)

    t0 = time.perf_counter()
    jax.block_until_ready(veto.decode_batch(tokens, valid))
    compile_s["hard"] = time.perf_counter() - t0
    # Interleave repeats so machine-load drift hits both alike; on a shared machine the best-of-N wall
    # time and the CPU time (all threads) are the stable estimators, so both are reported.
    runs = {"off": ([], []), "hard": ([], [])}
    for _ in range(args.repeats):
        for name, dec in (("off", plain), ("hard", veto)):
            w, cp = _timed(lambda dec=dec: jax.block_until_ready(dec.decode_batch(tokens, valid)), 1)
            runs[name][0].extend(w)
            runs[name][1].extend(cp)
    out_veto = jax.device_get(veto.decode_batch(tokens, valid))

    class HostVeto(LogitsProcessor):
        """Per step, per beam: probe the host table for each suffix length; forbid penalty > tau."""

        calls = 0

        def __call__(self, input_ids, scores):
            seqs = input_ids.tolist()
            for row, seq in enumerate(seqs):
                for k in range(2, min(c, len(seq)) + 1):
                    HostVeto.calls += 1
                    for tok, pen in host.get(tuple(seq[-k:]), {}).items():
                        if pen > 1.0:
                            scores[row, tok] = -float("inf")
            return scores

    ids = torch.tensor(tokens, dtype=torch.long)
    mask = torch.tensor(valid, dtype=torch.long)
    gen_kw = dict(attention_mask=mask, num_beams=args.beams, max_new_tokens=args.max_new,
                  min_new_tokens=args.max_new, do_sample=False, pad_token_id=0, eos_token_id=2,
                  length_penalty=0.6)  # fmt: skip
    with torch.no_grad():
        hf_model.generate(ids, **gen_kw)  # warm-up
        hf_runs = {"off": ([], []), "hard": ([], [])}
        for _ in range(args.hf_repeats):
            for name, procs in (("off", []), ("hard", [HostVeto()])):
                w, cp = _timed(lambda p=procs: hf_model.generate(ids, logits_processor=LogitsProcessorList(p), **gen_kw), 1)
                hf_runs[name][0].extend(w)
                hf_runs[name][1].extend(cp)

    new_tokens = args.batch * args.max_new
    print(f"\ndecode_bench: vocab {args.vocab}, hidden {args.hidden}, layers {args.layers}, batch {args.batch}, "
          f"beams {args.beams}, prompt bucket {args.prompt_len}, {args.max_new} new tokens, "
          f"veto table {table.num_contexts} contexts / {table.num_entries} entries (C={c}, built in {build_s:.2f}s), "
          f"devices: {jax.devices()[0].platform} x{len(jax.devices())}")  # fmt: skip
    rows = [
        ("ours beam, no veto", runs["off"], compile_s["off"]),
        ("ours Prov-Decode (hard veto)", runs["hard"], compile_s["hard"]),
        ("HF generate beams, no veto", hf_runs["off"], None),
        ("HF generate beams + host veto", hf_runs["hard"], None),
    ]
    print(f"{'method':32s} {'best s':>8s} {'median s':>9s} {'CPU s':>8s} {'tok/s(best)':>12s} {'1st call s':>10s}")
    for name, (wall, cpu), comp in rows:
        print(f"{name:32s} {min(wall):8.4f} {statistics.median(wall):9.4f} {statistics.median(cpu):8.4f} "
              f"{new_tokens / min(wall):12.1f} {'' if comp is None else f'{comp:10.2f}'}")
    best = {k: min(v[0]) for k, v in runs.items()}
    cpu = {k: statistics.median(v[1]) for k, v in runs.items()}
    hf_best = {k: min(v[0]) for k, v in hf_runs.items()}
    print(f"veto overhead (ours): best-of-{args.repeats} wall {100 * (best['hard'] / best['off'] - 1):+.1f}%, "
          f"median CPU time {100 * (cpu['hard'] / cpu['off'] - 1):+.1f}%")
    print(f"speed-up vs HF generate + host veto (best wall): {hf_best['hard'] / best['hard']:.1f}x   "
          f"(vs HF without veto: {hf_best['off'] / best['off']:.1f}x; "
          f"HF host-veto overhead {100 * (hf_best['hard'] / hf_best['off'] - 1):+.1f}%)")
    print(f"vetoes counted on the best beams: {int(out_veto.vetoes_BxK[:, 0].sum())}; "
          f"host probes per HF run: {HostVeto.calls // max(args.hf_repeats, 1)}")


if __name__ == "__main__":
    main()
