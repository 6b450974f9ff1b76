"""Typed, frozen run configuration: dataclasses are the schema, YAML sets values, CLI overrides are dotted.

    cfg = load_config("configs/tiny_cpu.yaml", ["train.learning_rate=1e-4", "loss.beta=0.2"])

Unknown keys and values of the wrong type raise ``ConfigError`` naming the dotted key and the file.
Every section below documents its fields; sections are plain dataclasses so a subsystem takes only
the one it needs (``train_step`` gets ``cfg.loss``, the mesh builder gets ``cfg.mesh``, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key.

    ``key`` (when known) is the dotted key at fault, so ``load_config`` can say whether the value came
    from the YAML file or from a ``--set`` override."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Run-time model options. The architecture itself comes from a HF ``config.json``.

    hf_dir: a Hugging Face checkpoint directory (config.json + safetensors) to load weights from.
    arch: HF ``config.json`` fields used when there is no ``hf_dir`` (random init), or to override it.
    dtype: compute dtype of activations (float32 | bfloat16); param_dtype: master weight dtype.
    remat: activation checkpointing per decoder layer: none | full | dots (save matmul outputs only).
    scan_layers: run the decoder layers as one ``lax.scan`` (compile time independent of depth; the
      default) or unrolled (compile time grows with depth; no stacked residual buffers, a little
      faster for shallow models). Parameters and checkpoints are the same either way.
    attention: training/scoring attention kernel: einsum (reference, materialised scores) | blocked
      (the reference per 128-query block, skipping the keys after the block: the fastest on CPU for
      long rows) | xla (jax.nn.dot_product_attention) | cudnn (GPU flash) | splash (TPU Pallas) |
      auto (cudnn on GPU, splash on TPU, blocked elsewhere); see ``model.attention``. Decoding always
      uses einsum.
    """

    hf_dir: str = ""
    arch: dict = dataclasses.field(default_factory=dict)
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots"] = "none"
    scan_layers: bool = True
    attention: Literal["auto", "einsum", "blocked", "xla", "cudnn", "splash"] = "einsum"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh with named axes (data, fsdp, tensor); -1 on one axis means "all remaining devices".

    rules: the logical-axis -> mesh-axis table: a preset name from ``sharding.RULE_PRESETS`` or an
      explicit list of ``[logical_name, mesh_axis_or_list_or_null]`` pairs.
    coordinator/num_processes/process_id: multi-process launch; empty coordinator with
      num_processes > 1 lets ``jax.distributed.initialize()`` auto-detect (Cloud TPU, SLURM).
    topology: the TPU slice a pod config is written for (e.g. ``v5p:4x4x2``); ``tracealign
      compile-check`` compiles for it when no ``--topology`` is given ("" = not a pod config).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: Any = "fsdp_tp"
    coordinator: str = ""
    num_processes: int = 1
    process_id: int = -1
    topology: str = ""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Preference data, read through ``datasets`` (see ``preference_sources``).

    train_path: a JSONL or Parquet file, a ``save_to_disk`` directory, or a Hub id (from the local HF cache).
    split: the split of a Hub id or of a saved ``DatasetDict``.
    format: auto | trl | pku_saferlhf | ultrafeedback_binarized (auto: from the columns).
    columns: {canonical name: column in the data}, e.g. ``{prompt: question, chosen: good, rejected: bad}``.
    pku_preference: which PKU-SafeRLHF label orders a pair: safer (safer_response_id) | better.
    num_proc: tokenizer processes (``datasets.map``); 0 = one per CPU (at most 8) above 20k records, else 1.
    truncation: keep_end keeps the end of an over-long prompt; keep_start keeps a response's start.
    buckets: allowed padded total lengths (prompt + response); a batch pads to the smallest that fits.
    bci_path / ref_logps_path: tensorstore stores streamed next to the tokens ("" = none).
    pair_layout: shared_prompt (one row per pair, prompt computed once, both responses attend to it)
      | separate (two rows per pair, the reference); see ``training.data``. DPO only.
    """

    train_path: str = ""
    split: str = "train"
    format: Literal["auto", "trl", "pku_saferlhf", "ultrafeedback_binarized"] = "auto"
    columns: dict = dataclasses.field(default_factory=dict)
    pku_preference: Literal["safer", "better"] = "safer"
    num_proc: int = 0
    tokenizer_dir: str = ""
    max_prompt_len: int = 64
    max_response_len: int = 64
    truncation: Literal["keep_end", "keep_start"] = "keep_end"
    buckets: tuple[int, ...] = (128,)
    shuffle_seed: int = 0
    skip_malformed: bool = False
    cache_dir: str = ""
    bci_path: str = ""
    ref_logps_path: str = ""
    pair_layout: Literal["shared_prompt", "separate"] = "shared_prompt"


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """DPO-family loss and the Contrastive Belief Deconfliction (CBD) terms.

    type: sigmoid | ipo | hinge | robust | trace. Conservative DPO (cDPO) is ``type: sigmoid`` with
      ``label_smoothing`` = its epsilon (the assumed label-flip probability, in [0, 0.5)); TRL 1.16's
      sigmoid loss ignores label_smoothing, ours applies the cDPO form (see ``training.losses``).
      trace: TRACE re-alignment on LoRA adapters (``realign.step``; its parameters are in ``realign``).
    beta: inverse temperature on log-ratio margins (nats^-1). rpo_alpha: weight of chosen NLL.
    cbd_data_weight / cbd_margin: term (a), hinge on high-BCI response tokens (margin in nats).
    cbd_cont_weight: term (b), the same hinge on the veto-table continuations of every response prefix.
    cbd_bci_scale: BCI (nats) at which a token / continuation weighs fully in both terms (w = min(b/s, 1));
      0 = the tau recorded with the BCI arrays or the veto table.
    reference: in_step (frozen copy in the step) | precomputed (streamed reference log-probs).
    cbd_veto_table: directory of a provenance veto table (needed when cbd_cont_weight > 0).
    cbd_min_prefix: veto entries apply once this many trailing tokens match a high-BCI span's prefix.
    """

    type: Literal["sigmoid", "ipo", "hinge", "robust", "trace"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    cbd_data_weight: float = 0.0
    cbd_margin: float = 1.0
    cbd_cont_weight: float = 0.0
    reference: Literal["in_step", "precomputed"] = "in_step"
    cbd_veto_table: str = ""
    cbd_min_prefix: int = 1
    cbd_bci_scale: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule and loop. batch_size counts preference pairs per optimizer step (global).

    objective: dpo (preference loss + CBD) | sft (NLL of prompt -> chosen/response, e.g. the reference).
    micro_batches: gradient accumulation steps per optimizer step (token-count weighted).
    logprob_chunk: sequence positions per logits block in the loss (0 = whole sequence at once).
    peak_flops_per_device: accelerator peak FLOP/s for MFU (0 = do not report MFU).
    """

    objective: Literal["dpo", "sft"] = "dpo"
    seed: int = 0
    steps: int = 100
    batch_size: int = 8
    micro_batches: int = 1
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    logprob_chunk: int = 0
    max_nonfinite_in_row: int = 5
    log_every: int = 1
    output_dir: str = "runs/train"
    peak_flops_per_device: float = 0.0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing: save every ``every_steps`` (0 = only final), keep the last ``keep_last``."""

    dir: str = ""
    every_steps: int = 0
    keep_last: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Decoding (beam search, greedy, sampling) and the provenance veto applied inside it.

    veto: off | soft (subtract gamma x penalty from candidate scores) | hard (forbid penalty > tau).
    min_prefix: the veto starts once the running suffix matches this many tokens of a high-BCI span.
    refusal: text emitted when every candidate of a row is vetoed ("" = end the row with EOS). In beam
      search a refusal ranks below every allowed hypothesis: it is the answer only when the row has none.
    prompt_buckets: padded prompt lengths, so a run compiles once per bucket.
    rules: the decode parameter / KV-cache layout: a ``sharding.RULE_PRESETS`` name (``decode_tp``:
      weights tensor-parallel or replicated, never re-gathered per token) or a rule list; "" = the
      training layout (``mesh.rules``). param_dtype: the weights' dtype while decoding ("" = model.param_dtype).
    """

    method: Literal["beam", "greedy", "sample"] = "beam"
    num_beams: int = 4
    max_new_tokens: int = 32
    length_penalty: float = 0.6
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    prompt_buckets: tuple[int, ...] = (16, 32, 64, 128)
    batch_size: int = 8
    veto: Literal["off", "soft", "hard"] = "off"
    gamma: float = 1.0
    tau: float = 0.0
    min_prefix: int = 1
    refusal: str = ""
    rules: Any = ""
    param_dtype: Literal["", "float32", "bfloat16"] = ""


@dataclasses.dataclass(frozen=True)
class ProvenanceConfig:
    """BCI scoring and the precomputed provenance arrays.

    bci: evidence (default: rarity x conflict, only where the support is most likely violating) |
      conflict_x_rarity (no evidence gate) | rarity (the paper's raw BCI). Formulas: provenance/bci.py.
    max_support: with ``rarity``, only spans occurring at most this often score (0 = no limit).
    sample_size: occurrences sampled (deterministically) to estimate a span's conflict share.
    conflict_prior: 0 (default) = Beta prior on the violating share fitted to the index (empirical
      Bayes, provenance/conflict_prior.py); a > 0 = the fixed symmetric prior Beta(a, a).
    min_posterior: with ``evidence``, a span scores only if P(violating share > 1/2) exceeds this.
    min_span / max_span: lengths of the maximal spans scored and of the veto-table spans.
    max_entries: most next-token entries kept per veto-table context.
    veto_weighting: conflict (default: an entry's penalty is the span's BCI x the conflict share of the
      prefix it completes, kept only above tau) | none (every prefix carries the span's full BCI).
    veto_min_conflict: with ``conflict``, entries whose prefix has a conflict share <= this are dropped
      (0.5: only continuations that mostly occur in violating documents are vetoed).
    target_fpr: false-positive rate the calibrated threshold tau aims for on compliant text.
    calibration_confidence: tau certifies FPR <= target_fpr with this probability (Clopper-Pearson;
      0 = the plain empirical quantile). See provenance/calibrate.py.
    index_path / threshold_path: the TraceIndex directory and its calibrated threshold JSON.
    top_sources: training-time sources listed per offending span in TraceShield reports.
    horizon / delta: completion length (tokens) and confidence parameter of the drift bound.
    """

    bci: Literal["evidence", "conflict_x_rarity", "rarity"] = "evidence"
    max_support: int = 0
    sample_size: int = 64
    conflict_prior: float = 0.0
    min_posterior: float = 0.5
    min_span: int = 4
    max_span: int = 12
    max_entries: int = 16
    veto_weighting: Literal["conflict", "none"] = "conflict"
    veto_min_conflict: float = 0.5
    target_fpr: float = 0.02
    calibration_confidence: float = 0.95
    index_path: str = ""
    threshold_path: str = ""
    top_sources: int = 3
    horizon: int = 32
    delta: float = 0.05


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """ADB evaluation and the end-to-end demo (``tracealign demo``, ``tracealign eval adb``).

    data_dir: ADB/default data directory ("" = generate: the shipped copy when the sizes below are
      the defaults and data_seed = 0). per_category / benign_per_template / facts / heldout_facts:
      sizes of the synthetic data (see evaluation.synthetic_data.generate).
    vocab_size: BPE vocabulary trained on the corpus. sft_*: the SFT stage that memorizes the corpus
      (steps, learning rate, pairs per step); dpo_* the DPO and DPO+CBD stages (same steps and lr).
    cbd_data_weight / cbd_cont_weight: CBD weights of the DPO+CBD policy (the DPO policy uses 0).
    defenses: which of none | traceshield | prov_decode | cbd | all to evaluate ("none" always runs).
    judge: exact (forbidden strings of the benchmark) | classifier (classifier_dir: local HF
      sequence-classification model); judge_window: words of a forbidden string that must match.
    max_prompts: evaluate only the first N ADB prompts (0 = all).
    realign_*: the re-alignment stage (``evaluation.realign_demo``): rules-judge policy file ("" = the
      shipped configs/policies/demo_shift.yaml), LoRA rank, steps and learning rate of each method.
    """

    data_dir: str = ""
    data_seed: int = 0
    per_category: int = 6
    benign_per_template: int = 16
    facts: int = 40
    heldout_facts: int = 24
    vocab_size: int = 768
    sft_steps: int = 400
    sft_learning_rate: float = 3e-3
    sft_batch_size: int = 16
    dpo_steps: int = 120
    dpo_learning_rate: float = 1e-4
    cbd_data_weight: float = 0.4
    cbd_cont_weight: float = 0.4
    defenses: tuple[str, ...] = ("none", "traceshield", "prov_decode", "cbd", "all")
    judge: Literal["exact", "classifier"] = "exact"
    judge_window: int = 6
    classifier_dir: str = ""
    max_prompts: int = 0
    realign_policy: str = ""
    realign_lora_rank: int = 8
    realign_steps: int = 40
    realign_learning_rate: float = 1e-3


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (``model.lora``): frozen base, only adapters trained.

    rank: r (0 = no adapters, full fine-tuning); alpha: scale numerator (scale = alpha / r, or
    alpha / sqrt(r) with use_rslora); dropout: on the adapter's input, training only; targets: the
    Hugging Face / PEFT names of the adapted projections.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"lora.rank: must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha: must be > 0, got {self.alpha}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise ConfigError(f"lora.targets: unknown module(s) {unknown} (known: {list(LORA_TARGETS)})")
        if self.rank and not self.targets:
            raise ConfigError("lora.targets: empty; name at least one projection")

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class RealignConfig:
    """TRACE re-alignment (``tracealign realign``): triage, impact weights, the hybrid objective.

    rules: policy YAML of the rules judge (``realign.judge``); label_cache: JSONL label cache ("" = none).
    beta: inverse temperature of the TRACE terms (nats^-1); alpha_kl: weight of the token KL on
    retained pairs; invert_loss: logistic (the paper's) | ipo (Azar et al.) on inverted pairs;
    rpo_alpha: weight of an NLL anchor on the newly preferred response of inverted pairs (not in the
    paper; ``realign.objective``; 0 = off); gamma: impact temperature (cancels after L1 normalisation); impact_batch_size: pairs per
    impact JVP (memory is that of one such batch).
    """

    rules: str = ""
    label_cache: str = ""
    beta: float = 0.3
    alpha_kl: float = 0.1
    invert_loss: Literal["logistic", "ipo"] = "logistic"
    rpo_alpha: float = 0.0
    gamma: float = 1.0
    impact_batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"realign.beta: must be > 0, got {self.beta}")
        if self.alpha_kl < 0:
            raise ConfigError(f"realign.alpha_kl: must be >= 0, got {self.alpha_kl}")
        if self.rpo_alpha < 0:
            raise ConfigError(f"realign.rpo_alpha: must be >= 0, got {self.rpo_alpha}")
        if not self.gamma > 0:
            raise ConfigError(f"realign.gamma: must be > 0, got {self.gamma}")
        if self.impact_batch_size < 1:
            raise ConfigError(f"realign.impact_batch_size: must be >= 1, got {self.impact_batch_size}")


@dataclasses.dataclass(frozen=True)
class Config:
    """One run: every section has defaults, a YAML file sets what differs."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
    provenance: ProvenanceConfig = dataclasses.field(default_factory=ProvenanceConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    realign: RealignConfig = dataclasses.field(default_factory=RealignConfig)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks/converts one YAML value to the annotated type ``tp``; raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}", key)
        return from_dict(tp, value, prefix=key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans: `--set decode.veto=off`
            for word in (("on", "yes", "true") if value else ("off", "no", "false")):
                if word in choices:
                    return word
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}", key)
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} matches none of {tp}: {errors}", key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {value!r}", key)
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key)
        return list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", key)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}", key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}", key)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}", key) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}", key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}", key)
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp}", key)


def from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from a nested dict, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{where}' (known: {sorted(names)}){hint}", where)
    kwargs = {}
    for name, value in values.items():
        where = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], where)
    obj = cls(**kwargs)
    _check_values(obj, prefix)
    return obj


# Ranges the types cannot express: {section class name: {field: (predicate, what it must be)}}.
_POS, _NONNEG = (lambda v: v >= 1, "an integer >= 1"), (lambda v: v >= 0, ">= 0")
_RANGES: dict[str, dict[str, tuple[Any, str]]] = {
    "TrainConfig": {"steps": _POS, "batch_size": _POS, "micro_batches": _POS, "log_every": _POS,
                    "max_nonfinite_in_row": _POS, "warmup_steps": _NONNEG, "learning_rate": _NONNEG,
                    "logprob_chunk": _NONNEG, "max_grad_norm": _NONNEG, "weight_decay": _NONNEG},
    "DataConfig": {"max_prompt_len": _POS, "max_response_len": _POS, "num_proc": _NONNEG,
                   "buckets": (lambda v: len(v) > 0 and min(v) >= 1, "a non-empty list of lengths >= 1")},
    "CheckpointConfig": {"every_steps": _NONNEG, "keep_last": _NONNEG},
    "DecodeConfig": {"num_beams": _POS, "max_new_tokens": _POS, "batch_size": _POS, "top_k": _NONNEG,
                     "temperature": (lambda v: v > 0, "> 0"), "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
                     "prompt_buckets": (lambda v: len(v) > 0 and min(v) >= 1, "a non-empty list of lengths >= 1")},
    "LossConfig": {"beta": (lambda v: v > 0, "> 0"), "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
                   "cbd_data_weight": _NONNEG, "cbd_cont_weight": _NONNEG, "cbd_min_prefix": _POS, "rpo_alpha": _NONNEG},
    "MeshConfig": {axis: (lambda v: v == -1 or v >= 1, "-1 (all remaining devices) or >= 1") for axis in ("data", "fsdp", "tensor")},
    "ProvenanceConfig": {"min_span": _POS, "max_span": _POS, "max_entries": _POS, "sample_size": _POS,
                         "target_fpr": (lambda v: 0 < v < 1, "in (0, 1)"), "delta": (lambda v: 0 < v < 1, "in (0, 1)")},
}  # fmt: skip

# HF config.json fields that ``ModelArch.from_hf_dict`` reads, or may ignore because they do not change
# the computation; anything else under ``model.arch`` is a typo and is refused (it would be ignored).
ARCH_KEYS = frozenset("""model_type architectures vocab_size hidden_size intermediate_size num_hidden_layers
    num_attention_heads num_key_value_heads head_dim rms_norm_eps rope_theta rope_scaling rope_parameters
    partial_rotary_factor tie_word_embeddings attention_bias mlp_bias max_position_embeddings sliding_window
    use_sliding_window max_window_layers layer_types initializer_range bos_token_id eos_token_id pad_token_id
    torch_dtype dtype hidden_act quantization_config attention_dropout use_cache pretraining_tp
    transformers_version""".split())


def _check_values(obj: Any, prefix: str) -> None:
    for name, (ok, must) in _RANGES.get(type(obj).__name__, {}).items():
        value = getattr(obj, name)
        if not ok(value):
            where = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{where}: must be {must}, got {value!r}", where)
    if isinstance(obj, ModelConfig):
        for key in obj.arch:
            if key not in ARCH_KEYS:
                where = f"{prefix}.arch.{key}" if prefix else f"arch.{key}"
                close = difflib.get_close_matches(key, sorted(ARCH_KEYS), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"unknown config key '{where}' (not a model config.json field this decoder reads)"
                                  f"{hint}", where)
    if isinstance(obj, ProvenanceConfig) and obj.max_span < obj.min_span:
        raise ConfigError(f"{prefix}.max_span: {obj.max_span} is below min_span {obj.min_span}", f"{prefix}.max_span")


def to_dict(cfg: Any) -> dict:
    """The plain-dict (YAML-ready) form of a config dataclass; tuples become lists."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def apply_overrides(values: dict, overrides: Sequence[str]) -> dict:
    """Applies ``a.b.c=yaml_value`` strings to a nested dict (the value is parsed as YAML)."""
    out = yaml.safe_load(yaml.safe_dump(values)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def check_columns(columns: dict) -> None:
    """``data.columns``: canonical field names (``preference_sources.CANONICAL_COLUMNS``) to column names."""
    from tracealign_jax.preference_sources import CANONICAL_COLUMNS

    for key, col in columns.items():
        if key not in CANONICAL_COLUMNS:
            close = difflib.get_close_matches(str(key), CANONICAL_COLUMNS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"data.columns: {key!r} is not a field a format reads (known: {list(CANONICAL_COLUMNS)})"
                              f"{hint}", "data.columns")  # fmt: skip
        if not isinstance(col, str) or not col:
            raise ConfigError(f"data.columns.{key}: expected a column name, got {col!r}", "data.columns")
    targets = list(columns.values())
    if len(set(targets)) != len(targets):
        raise ConfigError(f"data.columns: one column mapped to two fields ({columns})", "data.columns")


def validate(cfg: Config) -> Config:
    """Checks across fields that the types alone do not state; raises ``ConfigError`` naming the keys."""
    tc, loss = cfg.train, cfg.loss
    if tc.micro_batches < 1 or tc.batch_size % tc.micro_batches:
        raise ConfigError(f"train.micro_batches={tc.micro_batches} must divide train.batch_size={tc.batch_size} "
                          "(every micro-batch holds whole pairs)")  # fmt: skip
    check_columns(cfg.data.columns)
    if loss.type == "trace" and not cfg.lora.rank:
        raise ConfigError("loss.type=trace trains LoRA adapters: set lora.rank > 0", "lora.rank")
    if loss.type == "trace" and (tc.micro_batches != 1 or tc.objective != "dpo"):
        raise ConfigError("loss.type=trace: needs train.objective=dpo (pairs) and train.micro_batches=1", "train.micro_batches")
    if tc.objective == "dpo" and loss.cbd_cont_weight and loss.reference == "precomputed":
        raise ConfigError("loss.cbd_cont_weight > 0 needs the reference's log-probs of the veto entries, which "
                          "precomputed reference log-probs do not hold: use loss.reference=in_step")  # fmt: skip
    for key in ("realign_lora_rank", "realign_steps", "realign_learning_rate"):
        if not getattr(cfg.eval, key) > 0:
            raise ConfigError(f"eval.{key}: must be > 0, got {getattr(cfg.eval, key)}", f"eval.{key}")
    if cfg.decode.rules != "":
        from tracealign_jax.sharding import resolve_rules

        resolve_rules(cfg.decode.rules, "decode.rules")
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), cls: type = Config) -> Any:
    """Loads YAML ``path`` (or defaults when None), applies dotted overrides, returns a typed config."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    try:
        from_dict(cls, values)
    except ConfigError as err:  # the file itself is wrong (an override might hide it, but the file is still wrong)
        if not any(_override_key(o) and err.key and _covers(_override_key(o), err.key) for o in overrides):
            raise ConfigError(f"{path or '<defaults>'}: {err}", err.key) from None
    merged = apply_overrides(values, overrides)
    try:
        cfg = from_dict(cls, merged)
        return validate(cfg) if cls is Config else cfg
    except ConfigError as err:
        culprit = [o for o in overrides if err.key and _covers(_override_key(o), err.key)]
        where = f"--set {culprit[-1]}" if culprit else str(path or "<defaults>")
        raise ConfigError(f"{where}: {err}", err.key) from None


def _override_key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def _covers(dotted: str, key: str) -> bool:
    """Whether setting ``dotted`` sets (or is) ``key``: ``train`` covers ``train.steps``, and
    ``model.arch.x`` is covered by ``model.arch``, or covers it (``model.arch.x`` -> key ``model.arch.x``)."""
    return key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + ".")
