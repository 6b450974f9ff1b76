"""A decode job: policy (HF dir or training run) + tokenizer + prompts JSONL -> completions JSONL.

Prompt records: ``{"prompt": str}`` (tokenized without special tokens; a BOS is prepended when the
tokenizer defines one), ``{"prompt": [{"role": ..., "content": ...}, ...]}`` (a conversation, rendered
with the tokenizer's chat template and the assistant's generation prompt; the output's ``prompt`` is
that rendering) or ``{"prompt_ids": [int, ...]}``; an optional ``id`` is carried through
(default: the line number). Each output line: ``id, prompt, completion (text), token_ids, score,
logprob, veto_count, refused, truncated_prompt, vetoed_spans`` (each span: position, context_ids,
vetoed_token_ids, penalties and, with a tokenizer, the span text ``context + vetoed token``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal


from tracealign_jax import sharding
from tracealign_jax.atomic_io import atomic_write_jsonl
from tracealign_jax.chat import render_conversation
from tracealign_jax.config import Config, ConfigError, load_config
from tracealign_jax.decoding.runner import Completion, Decoder, decode_layout, with_param_dtype
from tracealign_jax.model import Transformer, model_options
from tracealign_jax.records import RecordError, iter_records, require


def _checkpoints_dir(path: Path) -> Path:
    """A run dir's ``checkpoints/``, or ``path`` itself (given the checkpoints dir)."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _run_config_path(path: Path) -> Path | None:
    """The config.yaml ``tracealign train`` wrote beside the checkpoints of run (or checkpoints) dir ``path``."""
    run_yaml = _checkpoints_dir(path).parent / "config.yaml"
    return run_yaml if path.is_dir() and run_yaml.is_file() else None


def model_dir_kind(path: str | Path) -> Literal["hf", "run"]:
    """What a model argument names: ``hf`` (a Hugging Face checkpoint dir: config.json) or ``run`` (a
    ``tracealign train`` run dir, or its checkpoints/: step folders or the recorded architecture).
    Anything else is refused with one line saying what is expected."""
    from tracealign_jax.training.checkpoint import ARCH_FILE

    path = Path(path)
    if (path / "config.json").is_file():
        return "hf"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory (give a Hugging Face checkpoint dir or a "
                                "`tracealign train` run dir)")
    ckpt_dir = _checkpoints_dir(path)
    if (ckpt_dir / ARCH_FILE).is_file() or any(p.name.isdigit() and p.is_dir() for p in ckpt_dir.iterdir()):
        return "run"
    raise ConfigError(f"{path}: not a model: no config.json (Hugging Face checkpoint) and no checkpoints/ "
                      "(a `tracealign train` run dir); give one of those")


def load_policy(cfg: Config, checkpoint: str | Path, mesh: Any, rules: sharding.Rules) -> Transformer:
    """The policy from a HF checkpoint dir (config.json), a training run dir (config.yaml +
    checkpoints/) or that run's ``checkpoints/`` dir.

    HF: the architecture is the checkpoint's (a ``cfg.model.arch`` that disagrees is refused). Run: the
    run's own config.yaml describes the saved train state (``cfg`` when the run has none) and its
    ``model_config.json`` the architecture; the latest step's params are restored onto this mesh.
    """
    path = Path(checkpoint)
    if model_dir_kind(path) == "hf":
        from tracealign_jax.hf_io import load_hf
        from tracealign_jax.model import model_arch

        model_arch(dataclasses.replace(cfg.model, hf_dir=str(path)))  # refuses a YAML arch that disagrees
        model, _ = load_hf(path, mesh=mesh, rules=rules, **model_options(cfg.model))
        return model
    ckpt_dir = _checkpoints_dir(path)
    from flax import nnx

    from tracealign_jax.training.checkpoint import restore_params
    from tracealign_jax.training.export import with_recorded_arch
    from tracealign_jax.training.state import abstract_train_state, graphdef_and_abstract_params

    run_yaml = _run_config_path(path)
    run_cfg = cfg if run_yaml is None else dataclasses.replace(load_config(run_yaml), mesh=cfg.mesh)
    if run_cfg.loss.type == "trace":
        raise ConfigError(f"{path}: a TRACE (LoRA) run: write the merged policy with `tracealign export-hf "
                          f"--checkpoint {path} --out DIR` and decode DIR")
    run_cfg = with_recorded_arch(run_cfg, ckpt_dir)  # the architecture the checkpoint was trained with
    graphdef, _ = graphdef_and_abstract_params(run_cfg, mesh, rules)
    params = restore_params(ckpt_dir, abstract_train_state(run_cfg, mesh, rules))
    return nnx.merge(graphdef, params)


def read_prompts(path: str | Path, tokenizer: Any, vocab_size: int | None = None) -> tuple[list[Any], list[str], list[list[int]]]:
    """(ids, prompt texts, prompt token ids) from JSONL/Parquet; errors name file, line and field
    (also a token id >= ``vocab_size``, the model's embedding rows)."""
    ids, texts, tokens = [], [], []
    for line, rec in iter_records(path):
        if "prompt_ids" in rec:
            toks = require(rec, "prompt_ids", list, path, line)
            if not toks or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in toks):
                raise RecordError(path, line, "prompt_ids", "expected a non-empty list of token ids")
            text = tokenizer.decode(toks) if tokenizer is not None else ""
        else:
            prompt = require(rec, "prompt", (str, list), path, line)
            if tokenizer is None:
                raise RecordError(path, line, "prompt", "text prompts need a tokenizer (--tokenizer DIR)")
            chat = isinstance(prompt, list)
            text = render_conversation(tokenizer, prompt, path, line) if chat else prompt
            toks = tokenizer.encode(text, add_special_tokens=False)
            if not chat and tokenizer.bos_token_id is not None:  # a chat template writes its own special tokens
                toks = [tokenizer.bos_token_id] + toks
            if not toks:
                raise RecordError(path, line, "prompt", "tokenizes to nothing")
        if vocab_size is not None and max(toks) >= vocab_size:
            field = "prompt_ids" if "prompt_ids" in rec else "prompt"
            raise RecordError(path, line, field, f"token id {max(toks)} >= the model's vocab_size {vocab_size} "
                                                 "(prompt tokenized with another tokenizer?)")
        ids.append(rec.get("id", line))
        texts.append(text)
        tokens.append([int(t) for t in toks])
    return ids, texts, tokens


def completion_record(rid: Any, prompt: str, comp: Completion, tokenizer: Any, eos_id: int) -> dict:
    shown = comp.token_ids[:-1] if comp.token_ids[-1:] == [eos_id] else comp.token_ids
    spans = []
    for span in comp.vetoed_spans:
        span = dict(span)
        if tokenizer is not None:
            span["texts"] = [tokenizer.decode(span["context_ids"] + [t]) for t in span["vetoed_token_ids"]]
        spans.append(span)
    return {
        "id": rid, "prompt": prompt, "completion": tokenizer.decode(shown) if tokenizer is not None else "",
        "token_ids": comp.token_ids, "score": comp.score, "logprob": comp.logprob, "veto_count": comp.vetoes,
        "refused": comp.refused, "truncated_prompt": comp.truncated_prompt, "vetoed_spans": spans,
    }  # fmt: skip


def _check_vocabularies(vocab_size: int, tok_dir: str, tokenizer: Any, table_dir: str, table_meta: dict) -> None:
    """Model, tokenizer and veto table must share one vocabulary: ids from another tokenizer would veto
    (or decode to) unrelated tokens without any error."""
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise ConfigError(f"{tok_dir}: the tokenizer has {len(tokenizer)} tokens, the model's vocab_size is {vocab_size}: "
                          "use the model's own tokenizer")
    if not table_dir:
        return
    if int(table_meta.get("vocab_size", 0)) > vocab_size:
        raise ConfigError(f"{table_dir}: veto table built over {table_meta['vocab_size']} tokens, the model has "
                          f"{vocab_size}: its index was tokenized with another tokenizer")
    theirs = table_meta.get("tokenizer_hash")
    if theirs and tok_dir and (Path(tok_dir) / "tokenizer.json").is_file():
        from tracealign_jax.index.corpus import tokenizer_fingerprint

        ours = tokenizer_fingerprint(tok_dir)[1]
        if ours != theirs:
            raise ConfigError(f"{table_dir}: veto table built with tokenizer {theirs}, but {tok_dir} has hash {ours}: "
                              "rebuild the table from an index of this tokenizer")


def _default_tokenizer_dir(checkpoint: Path) -> str:
    """The HF checkpoint's own tokenizer, or the ``data.tokenizer_dir`` of a training run ("" = none)."""
    if (checkpoint / "tokenizer_config.json").is_file():
        return str(checkpoint)
    run_yaml = _run_config_path(checkpoint)
    return "" if run_yaml is None else load_config(run_yaml).data.tokenizer_dir


def run_decode(cfg: Config, *, checkpoint: str, prompts: str, out: str, veto_table: str = "",
               tokenizer_dir: str = "", progress: bool = True) -> dict:  # fmt: skip
    """Runs the whole job; writes ``out`` atomically; returns a summary dict (counts, seconds)."""
    sharding.initialize_distributed(cfg.mesh)
    mesh = sharding.build_mesh(cfg.mesh)
    rules, _ = decode_layout(cfg)  # a checkpoint trained under mesh.rules is restored onto this layout
    tok_dir = tokenizer_dir or cfg.data.tokenizer_dir or _default_tokenizer_dir(Path(checkpoint))
    tokenizer = None
    if tok_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    table = None
    if cfg.decode.veto != "off":
        if not veto_table:
            raise ConfigError(f"decode.veto={cfg.decode.veto!r} needs --veto-table DIR")
        from tracealign_jax.veto.store import load_veto_table

        table, table_meta = load_veto_table(veto_table)
    model = with_param_dtype(load_policy(cfg, checkpoint, mesh, rules), cfg.decode.param_dtype)
    _check_vocabularies(model.arch.vocab_size, tok_dir, tokenizer, veto_table if table is not None else "",
                        table_meta if table is not None else {})
    refusal: list[int] = []
    if cfg.decode.refusal:
        if tokenizer is None:
            raise ConfigError("decode.refusal text needs a tokenizer (--tokenizer DIR)")
        refusal = tokenizer.encode(cfg.decode.refusal, add_special_tokens=False)
    decoder = Decoder(model, cfg.decode, refusal_ids=refusal, veto_table=table, mesh=mesh, rules=rules)
    ids, texts, tokens = read_prompts(prompts, tokenizer, model.arch.vocab_size)
    start = time.perf_counter()
    comps = decoder.decode(tokens, progress=progress)
    seconds = time.perf_counter() - start
    rows = [completion_record(i, t, c, tokenizer, decoder.eos_id) for i, t, c in zip(ids, texts, comps)]
    atomic_write_jsonl(out, rows)
    return {
        "prompts": len(rows), "out": str(out), "seconds": round(seconds, 3), "veto": cfg.decode.veto,
        "vetoes": sum(c.vetoes for c in comps), "refused": sum(c.refused for c in comps),
        "compiles": decoder.jitted()._cache_size(),
    }  # fmt: skip
