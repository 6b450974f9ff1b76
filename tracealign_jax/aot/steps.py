"""The steps compile-check compiles: the trainer's and decoder's own jitted functions, abstract inputs.

``build_specs(cfg, mesh, rules, steps=("train", "decode"))`` returns ``StepSpec``s for
``train[ref=precomputed]`` / ``train[ref=in_step]`` (``training.step.train_step_fn_and_shardings`` at
the config's largest data bucket, the reference mode switched per row; ``train[trace+lora]`` for
``loss.type: trace``, whose reference is the frozen LoRA base) and ``decode``
(``decoding.runner.abstract_decoder(...).jitted()`` at the largest prompt bucket). The veto table
enters as an abstract, replicated ``VetoTable`` of ``veto_contexts`` contexts and ``veto_entries``
entries; the defaults (2^24 / 2^25, 0.5 GB) stand for a table from a ~1 B-token unsafe corpus.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tracealign_jax import sharding
from tracealign_jax.aot.compile_check import StepSpec
from tracealign_jax.config import Config
from tracealign_jax.model.flops import flops_per_token, train_step_flops

DEFAULT_VETO_CONTEXTS = 2**24
DEFAULT_VETO_ENTRIES = 2**25
# Longest run of equal leading hashes a lookup window scans; only a static loop bound, small in practice.
DEFAULT_VETO_HI_RUN = 4


def abstract_veto_table(cfg: Config, mesh: Mesh, contexts: int, entries: int) -> Any:
    """A ``veto.table.VetoTable`` of ShapeDtypeStructs, replicated on ``mesh``."""
    from tracealign_jax.veto.table import VetoTable

    rep = NamedSharding(mesh, PartitionSpec())
    sds = lambda n, dt: jax.ShapeDtypeStruct((n,), dt, sharding=rep)  # noqa: E731
    return VetoTable(
        ctx_hi=sds(contexts, jnp.uint32), ctx_lo=sds(contexts, jnp.uint32), ctx_chk=sds(contexts, jnp.uint32),
        offsets=sds(contexts + 1, jnp.int32), next_tokens=sds(entries, jnp.int32),
        penalties=sds(entries, jnp.float32), context_len=cfg.provenance.max_span - 1,
        max_entries=cfg.provenance.max_entries, hi_run=DEFAULT_VETO_HI_RUN,
    )  # fmt: skip


def train_spec(cfg: Config, mesh: Mesh, rules: sharding.Rules, reference: str, veto: Any) -> StepSpec:
    """The trainer's jitted step for ``cfg`` with ``loss.reference = reference``, at the largest bucket
    (with LoRA: only the adapters differentiated and in the optimizer, the frozen base in the state)."""
    from tracealign_jax.model import model_arch, param_shardings
    from tracealign_jax.training.state import graphdef_and_abstract_params
    from tracealign_jax.training.step import batch_length, batch_rows, train_step_fn_and_shardings, unembedded_tokens

    # CBD term (b) needs the reference's log-probs of the veto entries, so it runs with in_step only;
    # the BCI scale is a constant folded into the program (any positive value compiles the same step).
    cont_weight = cfg.loss.cbd_cont_weight if reference == "in_step" else 0.0
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, reference=reference, cbd_cont_weight=cont_weight,
                                                            cbd_bci_scale=cfg.loss.cbd_bci_scale or 1.0))
    bucket = max(cfg.data.buckets)
    uses_veto = cfg.train.objective == "dpo" and cfg.loss.cbd_cont_weight > 0
    fn, abs_state, abs_batch = train_step_fn_and_shardings(cfg, mesh, rules, bucket)
    _, abs_params = graphdef_and_abstract_params(cfg, mesh, rules)
    arch = model_arch(cfg.model)
    length = batch_length(cfg, bucket)
    tokens = batch_rows(cfg) * length
    trace = cfg.loss.type == "trace"
    ref_forward = trace or (cfg.train.objective == "dpo" and reference == "in_step")
    flops = train_step_flops(arch, tokens, length, ref_forward=ref_forward, frozen_base=cfg.lora.rank > 0,
                             unembedded=unembedded_tokens(cfg, batch_rows(cfg), length))  # fmt: skip
    notes = f"bucket {bucket}, {batch_rows(cfg)} rows, micro_batches {cfg.train.micro_batches}, remat {cfg.model.remat}"
    if cfg.lora.rank:
        n_adapter = sum(x.size for x in jax.tree.leaves(abs_params))
        notes += (f", LoRA r={cfg.lora.rank} on {len(cfg.lora.targets)} projections ({n_adapter / 1e6:.1f} M float32 "
                  f"adapter params), frozen base {cfg.model.param_dtype}")
    if uses_veto:
        notes += f", veto table {veto.ctx_hi.shape[0]:,} contexts / {veto.next_tokens.shape[0]:,} entries"
    return StepSpec(
        name="train[trace+lora]" if trace else f"train[ref={reference}]", jitted=fn, args=(abs_state, abs_batch, veto if uses_veto else None), tokens=tokens,
        model_flops=flops, declared=param_shardings(abs_params, mesh, rules),
        select=lambda state: state.params, notes=notes, reduces_grads=True,
        frozen=(lambda state: state.frozen) if cfg.lora.rank else None,
        weight_passes=2 + ref_forward,  # fwd, bwd (+ reference fwd)
        compute_itemsize=jnp.dtype(cfg.model.dtype).itemsize,
    )  # fmt: skip


def decode_spec(cfg: Config, mesh: Mesh, veto: Any) -> StepSpec:
    """The decoder's jitted Prov-Decode function for ``cfg.decode`` at the largest prompt bucket, in the
    decode layout (``decode.rules`` / ``decode.param_dtype``; the training layout when unset)."""
    from tracealign_jax.decoding.runner import abstract_decoder, decode_layout
    from tracealign_jax.model import model_arch, param_shardings

    dc = cfg.decode
    rules, _ = decode_layout(cfg)
    decoder = abstract_decoder(cfg, mesh, rules, veto_table=veto if dc.veto != "off" else None)
    bucket = max(dc.prompt_buckets)
    args = decoder.abstract_inputs(bucket)
    arch = model_arch(cfg.model)
    beams = dc.num_beams if dc.method == "beam" else 1
    slots = bucket - 1 + dc.max_new_tokens  # KV-cache length: every step attends over all slots
    prefill_tokens = dc.batch_size * (bucket - 1)
    new_tokens = dc.batch_size * beams * dc.max_new_tokens
    flops = (prefill_tokens * flops_per_token(arch, bucket, train=False)
             + new_tokens * flops_per_token(arch, slots, train=False))  # fmt: skip
    notes = (f"{dc.method}, {dc.batch_size} prompts x {beams} beams, prompt {bucket} + {dc.max_new_tokens} new, "
             f"veto {dc.veto}, layout {dc.rules or 'train'} {dc.param_dtype or cfg.model.param_dtype}")
    return StepSpec(
        name="decode", jitted=decoder.jitted(), args=args, tokens=prefill_tokens + new_tokens, model_flops=flops,
        declared=param_shardings(decoder.params, mesh, rules), select=lambda params: params, notes=notes,
        weight_passes=dc.max_new_tokens + 1, generated_tokens=dc.max_new_tokens,  # prefill + one pass per step
        compute_itemsize=jnp.dtype(cfg.model.dtype).itemsize,
    )  # fmt: skip


def build_specs(
    cfg: Config,
    mesh: Mesh,
    rules: sharding.Rules,
    *,
    steps: Sequence[str] = ("train", "decode"),
    references: Sequence[str] = ("precomputed", "in_step"),
    veto_contexts: int = DEFAULT_VETO_CONTEXTS,
    veto_entries: int = DEFAULT_VETO_ENTRIES,
) -> list[StepSpec]:
    """StepSpecs in order: one train step per reference mode, then the decode step."""
    veto = abstract_veto_table(cfg, mesh, veto_contexts, veto_entries)
    specs = []
    if "train" in steps:
        if cfg.loss.type == "trace":  # one step, its reference the frozen base: listed under in_step
            refs = tuple(r for r in references if r == "in_step")
        else:
            refs = references if cfg.train.objective == "dpo" else ("precomputed",)
        specs += [train_spec(cfg, mesh, rules, ref, veto) for ref in refs]
    if "decode" in steps:
        specs.append(decode_spec(cfg, mesh, veto))
    return specs
