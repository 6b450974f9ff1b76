"""compile-check on the real train / decode steps for a TPU topology (needs libtpu: the tpu-aot extra).

The tiny config compiles for v5p:2x2x2 with an fsdp x tensor mesh; the compiled step's parameter
shardings equal those the rule table declares (checked leaf by leaf against hand-written specs);
an oversized config exits 1 naming its largest buffer; without libtpu the command says how to get it.
"""

from __future__ import annotations

import shutil

import jax
import pytest
from jax.sharding import PartitionSpec as P

from tracealign_jax import cli
from tracealign_jax.aot import hardware, pod_table, steps
from tracealign_jax.aot.compile_check import check_step, compiled_input_shardings, sharding_mismatches
from tracealign_jax.config import load_config
from tracealign_jax.model import param_shardings
from tracealign_jax.sharding import RULE_PRESETS, build_mesh, resolve_rules

needs_libtpu = pytest.mark.skipif(not hardware.libtpu_available(), reason="libtpu missing: pip install '.[tpu-aot]'")

TINY = "configs/tiny_cpu.yaml"
SHARDED = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]


@pytest.fixture(scope="module")
def compiled_tiny_train():
    """The tiny config's train step (precomputed reference) compiled for v5p:2x2x2, fsdp 4 x tensor 2."""
    cfg = load_config(TINY, SHARDED)
    devices = hardware.tpu_topology("v5p:2x2x2")
    mesh = build_mesh(cfg.mesh, devices=devices)
    rules = resolve_rules(cfg.mesh.rules)
    spec = steps.build_specs(cfg, mesh, rules, steps=("train",), references=("precomputed",))[0]
    report, compiled = check_step(spec, topology="v5p:2x2x2", chip=hardware.CHIPS["v5p"], num_devices=8)
    return cfg, mesh, rules, spec, report, compiled


@needs_libtpu
def test_tiny_config_compiles_for_v5p_and_fits(compiled_tiny_train):
    cfg, _, _, spec, report, compiled = compiled_tiny_train
    assert compiled is not None and report.fits and not report.compiler_refused
    assert report.num_devices == 8 and report.hbm_per_device == 95 * 10**9
    # shared-prompt rows (the default layout): one row per pair of prompt + both responses (64 + 32)
    assert report.tokens == cfg.train.batch_size * (max(cfg.data.buckets) + cfg.data.max_response_len)
    # FSDP over 4 chips: the step gathers weights and reduce-scatters / all-reduces gradients.
    assert report.costs.collectives["all-gather"].count > 0
    assert report.costs.collective_bytes > 0
    # Compiled matmul work is at least the model's 6N (+attention) count, and not wildly above it
    # (no remat here; the extra is the log-prob chunk matmuls and the CBD gathers).
    assert report.model_flops <= report.costs.matmul_flops * 8 <= 2.0 * report.model_flops
    assert 0 < report.memory.used_bytes < 1e9


@needs_libtpu
def test_compiled_param_shardings_equal_the_declared_ones(compiled_tiny_train):
    cfg, mesh, rules, spec, _, compiled = compiled_tiny_train
    got = compiled.input_shardings[0][0].params
    abstract = spec.args[0].params
    assert sharding_mismatches(param_shardings(abstract, mesh, rules), got, abstract) == []
    # Hand-written expectations from the fsdp_tp table: embed -> fsdp, heads/mlp/vocab -> tensor.
    expected = {
        "embed": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"),
        "wq": P(None, "fsdp", "tensor", None),
        "wk": P(None, "fsdp", "tensor", None),
        "wo": P(None, "tensor", None, "fsdp"),
        "w_up": P(None, "fsdp", "tensor"),
        "w_down": P(None, "tensor", "fsdp"),
    }
    flat = {jax.tree_util.keystr(path): (s, leaf) for (path, s), leaf in
            zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(abstract))}  # fmt: skip
    seen = set()
    for key, (s, leaf) in flat.items():
        name = [n for n in expected if f"'{n}'" in key]
        if name:
            seen.add(name[0])
            assert s.is_equivalent_to(jax.sharding.NamedSharding(mesh, expected[name[0]]), len(leaf.shape)), key
    assert seen == set(expected)
    # A different rule table must be detected as a mismatch.
    replicated = param_shardings(abstract, mesh, RULE_PRESETS["data_parallel"])
    assert sharding_mismatches(replicated, got, abstract)


@needs_libtpu
def test_splash_step_compiles_and_its_shardings_are_read_past_the_kernel_constants():
    """A splash train step compiles for v5p and ``compiled_input_shardings`` returns the arguments'
    shardings, equal to the declared ones. Since the kernel is built outside the trace
    (``attention._splash_kernel``) its mask tables are constants, not hoisted leading inputs, so jax
    0.10's ``input_shardings`` no longer miscounts them ("Too many leaves")."""
    cfg = load_config(TINY, ["mesh.data=1", "mesh.fsdp=4", "model.attention=splash", "data.buckets=[256]",
                             "data.max_prompt_len=128", "data.max_response_len=128"])  # fmt: skip
    mesh = build_mesh(cfg.mesh, devices=hardware.tpu_topology("v5p:2x2x1"))
    rules = resolve_rules(cfg.mesh.rules)
    spec = steps.build_specs(cfg, mesh, rules, steps=("train",), references=("in_step",))[0]
    report, compiled = check_step(spec, topology="v5p:2x2x1", chip=hardware.CHIPS["v5p"], num_devices=4)
    assert compiled is not None and report.fits
    got = compiled_input_shardings(compiled, spec.args)[0][0].params
    assert jax.tree.leaves(compiled.input_shardings[0][0].params) == jax.tree.leaves(got)
    abstract = spec.args[0].params
    assert sharding_mismatches(param_shardings(abstract, mesh, rules), got, abstract) == []
    assert sharding_mismatches(param_shardings(abstract, mesh, RULE_PRESETS["data_parallel"]), got, abstract)


@needs_libtpu
def test_table_and_config_comment_round_trip(compiled_tiny_train, tmp_path):
    _, _, _, _, report, _ = compiled_tiny_train
    config_copy = tmp_path / "tiny.yaml"
    shutil.copy(TINY, config_copy)
    rows = [pod_table.Row(config_copy, report, "2026-11-25, jax 0.10.2")]  # a row compiled on another day
    md = tmp_path / "README.md"
    md.write_text("# title\n\nintro\n")
    for _ in range(2):  # idempotent: the marked block is replaced, not appended again
        pod_table.write_markdown_table(rows, md, "<!-- b -->", "<!-- e -->")
        pod_table.update_config_comments(rows)
    text = md.read_text()
    assert text.count("<!-- b -->") == 1 and "| `tiny.yaml` | train[ref=precomputed] | v5p:2x2x2 (8) |" in text
    assert text.rstrip().endswith("| 2026-11-25, jax 0.10.2 |\n<!-- e -->")
    cfg_text = config_copy.read_text()
    assert cfg_text.count(pod_table.COMMENT_BEGIN) == 1 and "fits" in cfg_text and "(compiled 2026-11-25, jax 0.10.2)" in cfg_text
    assert load_config(config_copy) == load_config(TINY)
    # Saved reports rebuild the identical table without recompiling.
    pod_table.write_json(rows, tmp_path / "rows.json")
    assert pod_table.markdown_table(pod_table.read_json(tmp_path / "rows.json")) == pod_table.markdown_table(rows)


@needs_libtpu
def test_oversized_config_exits_nonzero_naming_largest_buffer(capsys):
    # A 2 x 10^6 x 4096 float32 embedding + head, replicated on each of four 16 GB v5e chips.
    code = cli.main([
        "compile-check", "--config", TINY, "--topology", "v5e:2x2", "--step", "train", "--reference", "precomputed",
        "--set", "model.arch.vocab_size=2000000", "--set", "model.arch.hidden_size=4096",
        "--set", "model.arch.num_attention_heads=32", "--set", "model.arch.num_key_value_heads=8",
        "--set", "train.batch_size=4",
    ])  # fmt: skip
    out = capsys.readouterr()
    assert code == 1
    assert "DOES NOT FIT" in out.err
    largest = out.err.split("largest buffers per device:")[1].strip().splitlines()[0]
    # The biggest per-chip buffer is a [2e6, 4096] float32 array (embedding, head or an Adam moment).
    assert "GiB" in largest and ("f32[2000000,4096]" in largest or "f32[4096,2000000]" in largest), largest


def test_without_libtpu_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(hardware, "libtpu_available", lambda: False)
    code = cli.main(["compile-check", "--config", TINY, "--topology", "v5p:2x2x2", "--step", "train"])
    assert code == 2
    assert "pip install '.[tpu-aot]'" in capsys.readouterr().err


@needs_libtpu
def test_decode_with_the_soft_veto_compiles_and_the_veto_adds_no_collective():
    """Prov-Decode with the soft veto compiled in, batch over 4 chips: the veto table is replicated and
    the veto's scatters run row by row, so a generated token costs only the loop's one-element
    all-reduces (18 B per chip). Before: the (row, token)-indexed scatter was all-gathered (144 KiB per
    token per chip), and the directory's associative_scan kept libtpu compiling for over 200 s."""
    cfg = load_config(TINY, ["mesh.data=4", "decode.veto=soft"])
    mesh = build_mesh(cfg.mesh, devices=hardware.tpu_topology("v5p:2x2x1"))
    spec = steps.build_specs(cfg, mesh, resolve_rules(cfg.mesh.rules), steps=("decode",))[0]
    assert "veto soft" in spec.notes
    report, compiled = check_step(spec, topology="v5p:2x2x1", chip=hardware.CHIPS["v5p"], num_devices=4)
    assert compiled is not None and report.fits
    assert report.generated_tokens == cfg.decode.max_new_tokens
    assert 0 < report.collective_bytes_per_token < 256, report.collective_bytes_per_token


@needs_libtpu
def test_trace_lora_step_gathers_the_frozen_head_once_per_model():
    """TRACE + LoRA with a frozen bf16 base, FSDP over 8 chips: the token-KL chunks use the head gathered
    once (policy and reference), not re-gathered inside every rematerialized chunk (which moved ~40 head
    copies per step on Llama-3.1-8B), and the expectation counts the frozen base's gathers."""
    cfg = load_config("configs/llama3_8b_trace_lora_v5e8.yaml", [
        "model.arch.num_hidden_layers=1", "model.arch.hidden_size=256", "model.arch.intermediate_size=512",
        "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2", "model.arch.head_dim=64",
        "model.attention=einsum", "data.max_prompt_len=64", "data.max_response_len=32", "data.buckets=[64]",
        "train.batch_size=8", "train.logprob_chunk=32",
    ])  # fmt: skip
    mesh = build_mesh(cfg.mesh, devices=hardware.tpu_topology("v5e:2x4"))
    spec = steps.build_specs(cfg, mesh, resolve_rules(cfg.mesh.rules), steps=("train",), references=("in_step",))[0]
    report, compiled = check_step(spec, topology="v5e:2x4", chip=hardware.CHIPS["v5e"], num_devices=8)
    assert compiled is not None and report.fits
    head_bytes = cfg.model.arch["vocab_size"] * 256 * 2 * 7 / 8  # bf16, 7/8 of it arrives from the other chips
    head_traffic = sum(s.wire_bytes for (kind, op), s in report.costs.sources.items()
                       if "bcd,dv->bcv" in op and kind in ("all-gather", "collective-permute"))  # fmt: skip
    assert head_traffic <= 2 * head_bytes, head_traffic / head_bytes
    base = sum(x.size for x in jax.tree.leaves(spec.args[0].frozen)) * 2 * 7 / 8
    assert report.expected_collectives["all-gather"] >= spec.weight_passes * base * 0.99
