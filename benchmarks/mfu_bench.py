"""Model FLOPs utilisation of our DPO train step on one accelerator: the prepared script for a GPU lend.

The real jitted step (``training.step``: shared-prompt pair rows, response-only logits, the fused
attention ``model.attention: auto`` picks: cuDNN flash on GPU, Splash on TPU, blocked einsum on CPU)
on a random Llama-3.2-1B-shaped model (``--preset 1b``: hidden 2048, 16 layers, 32 / 8 heads of 64,
MLP 8192, vocab 128,256, tied embeddings; ``--preset tiny`` to try the script on a CPU), bf16 compute
over float32 parameters, reference log-probs precomputed (``--reference in_step`` adds its forward),
``--pairs`` random pairs of ``--prompt`` + ``--response`` tokens. Warm-up steps, then ``--steps``
timed steps, each waited for.

MFU = model FLOPs per step / step time / peak bf16 FLOP/s of the device. Model FLOPs are the analytic
count the training loop logs (``model.flops.train_step_flops``: 6 x matmul parameters per token plus
attention, the LM head on scored slots only, plus a reference forward when it runs in the step). The
peak comes from ``--peak-tflops`` or the device kind (dense bf16, vendor spec sheets: H100 / H200 SXM
989, A100 312, L4 121 TFLOP/s); none is assumed for a CPU.

    .venv/bin/python benchmarks/mfu_bench.py --preset tiny --steps 3            # the script itself, on CPU
    python benchmarks/mfu_bench.py --preset 1b --pairs 16 --steps 10             # on the GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

PRESETS = {
    "1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
               rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False),
}  # fmt: skip
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L4": 121.0}


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak of a known accelerator, by the first name in ``PEAK_BF16_TFLOPS`` its kind mentions."""
    kind = device_kind.upper()
    for name in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_BF16_TFLOPS[name]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--response", type=int, default=128)
    ap.add_argument("--layout", choices=["shared_prompt", "separate"], default="shared_prompt")
    ap.add_argument("--reference", choices=["precomputed", "in_step"], default="precomputed")
    ap.add_argument("--remat", choices=["none", "full", "dots"], default="none")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s (default: by device kind)")
    args = ap.parse_args()

    import jax

    from train_bench import make_ours, timed
    from tracealign_jax.model import ModelArch, model_arch
    from tracealign_jax.model.attention import resolve
    from tracealign_jax.model.flops import matmul_params, train_step_flops
    from tracealign_jax.training.step import unembedded_tokens

    device = jax.devices()[0]
    model = {"dtype": "bfloat16", "param_dtype": "float32", "scan_layers": True, "remat": args.remat,
             "attention": args.attention}  # fmt: skip
    step = make_ours(args.prompt, args.response, args.layout, cbd=False, cost=False, arch=PRESETS[args.preset],
                     pairs=args.pairs, model=model, loss={"reference": args.reference})  # fmt: skip
    arch: ModelArch = model_arch(step.cfg.model)
    rows, length = step.rows_x_length
    flops = train_step_flops(arch, rows * length, length, ref_forward=args.reference == "in_step",
                             unembedded=unembedded_tokens(step.cfg, rows, length))  # fmt: skip
    t0 = time.perf_counter()
    step.run()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step.run()
    times = [timed(step.run)[0] for _ in range(args.steps)]
    sec = statistics.median(times)
    peak = args.peak_tflops or peak_tflops(device.device_kind)
    print(f"device: {device.device_kind} ({device.platform}); attention {resolve(args.attention)}; "
          f"{matmul_params(arch) / 1e6:,.1f} M matmul parameters; {args.pairs} pairs of {args.prompt} + {args.response} "
          f"as {rows} rows x {length} ({args.layout}); reference {args.reference}; remat {args.remat}; first step "
          f"(compile) {compile_s:.1f} s")
    print("| step ms (median of %d) | model TFLOP / step | achieved TFLOP/s | peak TFLOP/s | MFU |" % args.steps)
    print("|---|---|---|---|---|")
    mfu = f"{100 * flops / sec / (peak * 1e12):.1f}%" if peak else "n/a (no peak known for this device)"
    print(f"| {sec * 1e3:.1f} | {flops / 1e12:.3f} | {flops / sec / 1e12:.2f} | {peak or 'n/a'} | {mfu} |")


if __name__ == "__main__":
    main()
