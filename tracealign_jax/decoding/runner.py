"""Decoding a list of prompts with a policy: bucketing, fixed-shape batches, sharding, one jit per bucket.

    decoder = Decoder(model, cfg.decode, veto_table=table, mesh=mesh, rules=rules)
    completions = decoder.decode([[1, 2, 3], [4, 5]])            # veto as cfg.decode.veto says
    completions = decoder.decode(prompts, veto="off")            # same policy, no veto

Prompts are left-padded to the smallest of ``DecodeConfig.prompt_buckets`` that fits (longer ones
keep their last tokens and are flagged ``truncated_prompt``) and grouped into batches of exactly
``batch_size`` rows (filler rows complete the last batch), so a run compiles once per (bucket, veto
mode): ``decoder.jitted(mode)._cache_size()`` counts it. Rows are sharded over the mesh's batch axes
(logical name ``batch``); parameters keep the layout they are given. ``decode_layout(cfg)`` is the
layout a decode job loads them into: ``decode.rules`` (e.g. ``decode_tp``: no weight sharded over
``fsdp``, so no step re-gathers the model) and ``decode.param_dtype``.

For ahead-of-time compilation: ``decoder.jitted(mode).lower(*decoder.abstract_inputs(bucket)).compile()``
lowers exactly the function ``decode`` runs (``abstract_decoder`` builds one without weights).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from tracealign_jax import sharding
from tracealign_jax.config import Config, ConfigError, DecodeConfig, ModelConfig
from tracealign_jax.decoding.beam_search import beam_search
from tracealign_jax.decoding.model_step import make_tokens_to_logits, prefill
from tracealign_jax.decoding.sampling import sample
from tracealign_jax.decoding.step import DecodeOutput, prompt_context
from tracealign_jax.decoding.veto_hook import VetoLookup, VetoSpec, default_lookup, make_veto_hook
from tracealign_jax.model import Transformer


@dataclasses.dataclass
class Completion:
    """One prompt's result (token ids exclude the prompt; ``token_ids`` ends with EOS when it stopped).

    beams: every valid returned sequence, best first, as (token ids, score). vetoed_spans: for each
    step of the best sequence where the veto fired, the running context's last C tokens and the
    vetoed next tokens with their penalties (nats).
    """

    prompt_ids: list[int]
    token_ids: list[int]
    score: float
    logprob: float
    vetoes: int
    refused: bool
    truncated_prompt: bool
    beams: list[tuple[list[int], float]]
    vetoed_spans: list[dict]


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length, else the largest (the prompt is then cut to its last tokens)."""
    fitting = [b for b in sorted(buckets) if b >= length]
    return fitting[0] if fitting else max(buckets)


def left_pad(prompts: Sequence[Sequence[int]], bucket: int, rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BxL int32, valid_BxL bool) with ``rows`` rows; missing rows are one pad token (filler)."""
    tokens = np.full((rows, bucket), pad_id, np.int32)
    valid = np.zeros((rows, bucket), bool)
    valid[:, -1] = True
    for i, prompt in enumerate(prompts):
        tail = list(prompt)[-bucket:]
        tokens[i, bucket - len(tail) :] = tail
        valid[i, bucket - len(tail) :] = True
    return tokens, valid


def _first_id(ids: Any, default: int) -> int:
    if ids is None:
        return default
    return int(ids[0]) if isinstance(ids, (list, tuple)) else int(ids)


def decode_layout(cfg: Config) -> tuple[sharding.Rules, ModelConfig]:
    """(rule table, model config with the decode parameter dtype) a decode job places the policy in."""
    rules = sharding.resolve_rules(cfg.decode.rules, "decode.rules") if cfg.decode.rules != "" else (
        sharding.resolve_rules(cfg.mesh.rules))
    return rules, dataclasses.replace(cfg.model, param_dtype=cfg.decode.param_dtype or cfg.model.param_dtype)


def with_param_dtype(model: Transformer, dtype: str) -> Transformer:
    """``model`` with its floating-point parameters cast to ``dtype`` (shardings kept; "" = unchanged)."""
    if not dtype:
        return model
    graphdef, params = nnx.split(model)
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    return nnx.merge(graphdef, jax.tree.map(cast, params))


class Decoder:
    """A policy + DecodeConfig (+ optional veto table) ready to decode batches of token prompts."""

    def __init__(
        self,
        model: Transformer | tuple[nnx.GraphDef, Any],
        cfg: DecodeConfig,
        *,
        eos_id: int | None = None,
        pad_id: int | None = None,
        refusal_ids: Sequence[int] = (),
        veto_table: Any = None,
        veto_lookup: VetoLookup | None = None,
        mesh: Mesh | None = None,
        rules: sharding.Rules | None = None,
    ):
        if isinstance(model, nnx.Module):
            self.graphdef, self.params = nnx.split(model)
            arch = model.arch
        else:  # (graphdef, params), params possibly abstract (ShapeDtypeStructs) for AOT lowering
            self.graphdef, self.params = model
            arch = nnx.merge(self.graphdef, self.params).arch
        self.cfg = cfg
        self.eos_id = eos_id if eos_id is not None else _first_id(getattr(arch, "eos_token_id", None), 0)
        self.pad_id = pad_id if pad_id is not None else _first_id(getattr(arch, "pad_token_id", None), 0)
        self.refusal_ids = tuple(int(t) for t in refusal_ids)
        if mesh is not None and veto_table is not None:  # every device looks up its own rows: replicate
            replicated = NamedSharding(mesh, PartitionSpec())
            veto_table = jax.tree.map(  # abstract tables (AOT) keep their ShapeDtypeStructs
                lambda x: jax.device_put(x, replicated) if isinstance(x, (jax.Array, np.ndarray)) else x, veto_table
            )
        self.veto_table = veto_table
        self.veto_lookup = veto_lookup
        self.mesh, self.rules = mesh, rules
        if mesh is not None:
            if rules is None:
                raise ValueError("Decoder: rules are required with a mesh")
            shards = _batch_shards(mesh, rules)
            if cfg.batch_size % shards:
                raise ConfigError(f"decode.batch_size={cfg.batch_size} must divide by the {shards} batch shards")
        if cfg.veto != "off" and veto_table is None:
            raise ConfigError(f"decode.veto={cfg.veto!r} needs a veto table")
        self._fns: dict[str, Callable] = {}
        self._spans_fn: Callable | None = None

    # ---- the compiled function -------------------------------------------------------------
    def spec(self, veto: str | None = None) -> VetoSpec:
        mode = self.cfg.veto if veto is None else veto
        c = self.veto_table.context_len if (mode != "off" and self.veto_table is not None) else 1
        return VetoSpec.from_config(dataclasses.replace(self.cfg, veto=mode), c)

    def jitted(self, veto: str | None = None) -> Callable:
        """The jitted ``fn(params, tokens_BxL, valid_BxL, veto_table, rng) -> DecodeOutput`` for a mode."""
        spec = self.spec(veto)
        if spec.mode not in self._fns:
            if spec.mode != "off" and self.veto_table is None:
                raise ConfigError(f"veto={spec.mode!r} needs a veto table")
            fn = decode_function(
                self.graphdef, self.cfg, spec, self.veto_lookup, eos_id=self.eos_id, pad_id=self.pad_id,
                refusal_ids=self.refusal_ids, mesh=self.mesh, rules=self.rules,
            )
            self._fns[spec.mode] = jax.jit(fn, **self._shardings())
        return self._fns[spec.mode]

    def _shardings(self) -> dict[str, Any]:
        """jit in/out shardings on the mesh (as the train step): parameters where they live, prompt rows
        and per-row outputs over the batch axes, veto table, RNG key and step count replicated."""
        if self.mesh is None:
            return {}
        rows, replicated = self._row_sharding(), NamedSharding(self.mesh, PartitionSpec())
        params = jax.tree.map(lambda x: x.sharding, self.params)
        per_row = {f.name: rows for f in dataclasses.fields(DecodeOutput) if f.name != "steps"}
        out = DecodeOutput(**per_row, steps=replicated)
        return {"in_shardings": (params, rows, rows, replicated, replicated), "out_shardings": out}

    def _row_sharding(self) -> Any:
        if self.mesh is None:
            return None
        return sharding.named_sharding(self.mesh, self.rules, ("batch", None))

    def abstract_inputs(self, bucket: int, veto: str | None = None) -> tuple:
        """ShapeDtypeStructs (with shardings) of ``jitted(veto)``'s arguments for prompt bucket ``bucket``."""
        rows = self._row_sharding()
        sds = lambda x, s=None: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s if s is not None else getattr(x, "sharding", None))  # noqa: E731
        b = self.cfg.batch_size
        table = self.veto_table if self.spec(veto).mode != "off" else None
        return (
            jax.tree.map(sds, self.params),
            jax.ShapeDtypeStruct((b, bucket), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((b, bucket), jnp.bool_, sharding=rows),
            jax.tree.map(sds, table),
            jax.eval_shape(lambda: jax.random.key(0)),
        )

    # ---- decoding ----------------------------------------------------------------------------
    def decode_batch(self, tokens_BxL: np.ndarray, valid_BxL: np.ndarray, *, veto: str | None = None,
                     seed: int | None = None) -> DecodeOutput:
        """One fixed-shape batch (left-padded, ``batch_size`` rows) -> DecodeOutput on device."""
        mode = self.spec(veto).mode
        rows = self._row_sharding()
        put = (lambda x: jax.device_put(x, rows)) if rows is not None else jnp.asarray
        rng = jax.random.key(self.cfg.seed if seed is None else seed)
        table = self.veto_table if mode != "off" else None
        return self.jitted(mode)(self.params, put(tokens_BxL), put(valid_BxL), table, rng)

    def decode(self, prompts: Sequence[Sequence[int]], *, veto: str | None = None, progress: bool = False,
               seed: int | None = None) -> list[Completion]:
        """Decodes token-id prompts in input order (bucketed, batched); see ``Completion``."""
        mode = self.spec(veto).mode
        b = self.cfg.batch_size
        by_bucket: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            by_bucket.setdefault(pick_bucket(len(p), self.cfg.prompt_buckets), []).append(i)
        results: list[Completion | None] = [None] * len(prompts)
        batches = [(bucket, idx[s : s + b]) for bucket, idx in sorted(by_bucket.items()) for s in range(0, len(idx), b)]
        base_seed = self.cfg.seed if seed is None else seed
        for n, (bucket, idx) in enumerate(tqdm(batches, desc="decode", unit="batch", disable=not progress)):
            chunk = [prompts[i] for i in idx]
            tokens, valid = left_pad(chunk, bucket, b, self.pad_id)
            out = jax.device_get(self.decode_batch(tokens, valid, veto=mode, seed=base_seed + n))
            spans = self._vetoed_spans(self.spec(mode), tokens, valid, out, len(chunk)) if mode != "off" else [[] for _ in chunk]
            for row, i in enumerate(idx):
                results[i] = self._completion(chunk[row], bucket, out, row, spans[row])
        return results  # type: ignore[return-value]

    def _completion(self, prompt: Sequence[int], bucket: int, out: DecodeOutput, row: int, spans: list[dict]) -> Completion:
        beams = []
        for j in range(out.scores_BxK.shape[1]):
            if out.valid_BxK[row, j]:
                n = int(out.lengths_BxK[row, j])
                beams.append(([int(t) for t in out.tokens_BxKxT[row, j, :n]], float(out.scores_BxK[row, j])))
        return Completion(
            prompt_ids=[int(t) for t in prompt], token_ids=beams[0][0] if beams else [],
            score=float(out.scores_BxK[row, 0]), logprob=float(out.logprobs_BxK[row, 0]),
            vetoes=int(out.vetoes_BxK[row, 0]), refused=bool(out.refused_BxK[row, 0]),
            truncated_prompt=len(prompt) > bucket, beams=beams, vetoed_spans=spans,
        )  # fmt: skip

    def _vetoed_spans(self, spec: VetoSpec, tokens_BxL: np.ndarray, valid_BxL: np.ndarray, out: DecodeOutput,
                      n: int) -> list[list[dict]]:  # fmt: skip
        """Where the veto fired along each row's best sequence: one batched lookup of every step's context."""
        c = spec.context_len
        t = out.tokens_BxKxT.shape[-1]
        ctx = np.zeros((n, t, c), np.int32)
        ctx_len = np.zeros((n, t), np.int32)
        steps: list[int] = []
        for row in range(n):
            prompt = list(tokens_BxL[row][valid_BxL[row]])
            gen = list(out.tokens_BxKxT[row, 0])
            emitted = int(out.lengths_BxK[row, 0])
            if out.refused_BxK[row, 0]:  # the refusal's own tokens were never looked up; its first step was
                emitted = emitted - (len(self.refusal_ids) + (0 if self.refusal_ids[-1:] == (self.eos_id,) else 1)) + 1
            steps.append(emitted)
            for i in range(emitted):
                hist = (prompt + gen[:i])[-c:]
                ctx[row, i, c - len(hist) :] = hist
                ctx_len[row, i] = len(hist)
        if self._spans_fn is None:
            lookup = self.veto_lookup or default_lookup()
            self._spans_fn = jax.jit(lambda table, x, xl: lookup(table, x, xl, spec.min_prefix))
        ids, pens, ok = jax.device_get(self._spans_fn(self.veto_table, ctx.reshape(n * t, c), ctx_len.reshape(n * t)))
        ids, pens, ok = (a.reshape(n, t, -1) for a in (ids, pens, ok))
        spans: list[list[dict]] = []
        for row in range(n):
            found = []
            for i in range(steps[row]):
                hit = ok[row, i] & (pens[row, i] > spec.tau)
                if hit.any():
                    found.append({
                        "position": i,
                        "context_ids": [int(x) for x in ctx[row, i, c - ctx_len[row, i] :]],
                        "vetoed_token_ids": [int(x) for x in ids[row, i][hit]],
                        "penalties": [round(float(x), 4) for x in pens[row, i][hit]],
                    })  # fmt: skip
            spans.append(found)
        return spans


def _batch_shards(mesh: Mesh, rules: sharding.Rules) -> int:
    spec = sharding.logical_to_spec(("batch",), rules)[0]
    axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def decode_function(
    graphdef: nnx.GraphDef,
    cfg: DecodeConfig,
    spec: VetoSpec,
    lookup: VetoLookup | None,
    *,
    eos_id: int,
    pad_id: int,
    refusal_ids: Sequence[int],
    mesh: Mesh | None,
    rules: sharding.Rules | None,
) -> Callable[..., DecodeOutput]:
    """The pure decode ``fn(params, tokens_BxL, valid_BxL, veto_table, rng) -> DecodeOutput`` (jit it)."""

    def fn(params: Any, tokens_BxL: jax.Array, valid_BxL: jax.Array, table: Any, rng: jax.Array) -> DecodeOutput:
        ctx = sharding.use_mesh(mesh, rules) if mesh is not None else _null()
        with ctx:
            model = nnx.merge(graphdef, params)
            state, last_B, prompt_len_B = prefill(model, tokens_BxL, valid_BxL, cfg.max_new_tokens)
            context_BxC, context_len_B = prompt_context(tokens_BxL, prompt_len_B, spec.context_len)
            common = dict(
                max_new_tokens=cfg.max_new_tokens, eos_id=eos_id, pad_id=pad_id, refusal=tuple(refusal_ids),
                logits_hook=make_veto_hook(spec, table, lookup),
            )
            step = make_tokens_to_logits(model)
            if cfg.method == "beam":
                return beam_search(step, state, last_B, context_BxC, context_len_B, num_beams=cfg.num_beams,
                                   alpha=cfg.length_penalty, **common)  # fmt: skip
            rng_arg = None if cfg.method == "greedy" else rng
            return sample(step, state, last_B, context_BxC, context_len_B, rng=rng_arg,
                          temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, **common)  # fmt: skip

    return fn


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def abstract_decoder(cfg: Any, mesh: Mesh, rules: sharding.Rules, veto_table: Any = None) -> Decoder:
    """A Decoder over ABSTRACT parameters (no weights) for ``jitted(...).lower(*abstract_inputs(bucket))``.

    cfg: the full ``Config`` (model arch + dtypes from ``cfg.model``, decoding from ``cfg.decode``);
    ``rules``: the decode layout's (``decode_layout(cfg)[0]``); parameters in ``decode.param_dtype``.
    """
    from tracealign_jax.model import abstract_model_from_config, model_arch

    arch = model_arch(cfg.model)
    graphdef, params = abstract_model_from_config(decode_layout(cfg)[1], mesh, rules)
    return Decoder((graphdef, params), cfg.decode, eos_id=_first_id(arch.eos_token_id, 0),
                   pad_id=_first_id(arch.pad_token_id, 0), veto_table=veto_table, mesh=mesh, rules=rules)  # fmt: skip
