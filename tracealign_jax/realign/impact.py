"""Alignment impact of conflicting pairs: <g_J, g_i> for every pair without per-example gradients.

TRACE weights a conflicting pair i by ``w_i = max(0, <g_J, g_i>) / gamma``, L1-normalised over the
conflicts, where g_J is the gradient of the preference loss on the "gold" set (retained pairs as
stored, inverted pairs flipped) at the reference parameters theta_ref and g_i the gradient of pair
i's own TRACE term (flipped logistic / IPO if inverted, dual NPO if suppressed). (gamma cancels in the
normalisation; it scales only the unnormalised ``raw`` weights.)

How: the per-pair loss vector ``l(theta)`` [B] has Jacobian rows g_i, so one forward-mode product
``jax.jvp(l, (theta,), (g_J,))`` returns ``J g_J = [<g_i, g_J>]_i`` for the whole batch at about the
cost of two forward passes, with memory of one forward pass: nothing of size B x |theta| exists.
``explicit_scores`` is the ``vmap(grad)`` reference that materialises every g_i (tests, benchmark).

On a pod: ``impact_scores`` / ``gold_gradient`` run both programs on a device mesh (``on_mesh``) as
the train step does: weights and g_J sharded by ``mesh.rules``, pair rows split over the batch axes,
multi-process when the mesh spans processes; a batch with no gold pair skips the gold pass and a
batch with no conflict the JVP pass.

At theta_ref the reference log-probs equal the policy's, so the log-ratio is written
``logp(theta) - stop_gradient(logp(theta))``: value 0, derivative that of logp, one forward pass for
both models. This is exact only AT theta_ref, which is the only point these functions evaluate.

Batches: a training layout (``training.data.build_batch``): tokens / positions / valid / loss_mask
either [2B, L] with rows 2i = y_w, 2i+1 = y_l as stored (separate), or [B, L] shared-prompt rows
``[prompt | y_w | y_l]`` with ``branch`` (the prompt computed once), plus ``category`` int32 [B] from
``realign.triage`` and PAD = -1 for filler pairs, which count nowhere. ``response_len`` > 0 (static:
at least the most response tokens of any row) unembeds only the response tokens
(``logprobs.scored_slots``); 0 unembeds every position. ``attention``: the ``model.attention``
implementation of the forward (static).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from tracealign_jax import sharding

from tracealign_jax.realign.objective import InvertLoss, dual_npo_losses, invert_losses
from tracealign_jax.realign.triage import INVERT, RETAIN, SUPPRESS
from tracealign_jax.training.logprobs import scored_slots, token_logprobs

PAD = -1
Batch = dict[str, jax.Array]


def pair_logps(graphdef: nnx.GraphDef, params: Any, batch: Batch, chunk: int = 0, response_len: int = 0,
               attention: str = "einsum") -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(log pi(y_w | x), log pi(y_l | x)) of every pair, summed over response tokens: float32[B] each (nats)."""
    model = nnx.merge(graphdef, params)
    branch = batch.get("branch")
    h, _ = model.hidden(batch["tokens"], batch["positions"], batch["valid"], branch_BxL=branch, attention=attention)
    tokens, mask = batch["tokens"], batch["loss_mask"].astype(jnp.float32)
    scored = scored_slots(tokens, branch, mask, response_len)
    logps, _ = token_logprobs(h, model.unembedding_matrix(), tokens, scored, chunk=chunk, compute_dtype=model.dtype)
    logps = logps * mask
    if branch is None:  # separate rows: 2i = y_w, 2i+1 = y_l
        per_row = jnp.sum(logps, axis=-1).reshape(-1, 2)
        return per_row[:, 0], per_row[:, 1]
    return jnp.sum(jnp.where(branch == 1, logps, 0.0), -1), jnp.sum(jnp.where(branch == 2, logps, 0.0), -1)


def _ratios(graphdef: nnx.GraphDef, params: Any, batch: Batch, chunk: int, response_len: int,
            attention: str) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    w, l = pair_logps(graphdef, params, batch, chunk, response_len, attention)
    # 0 at theta_ref, d logp elsewhere
    return w - jax.lax.stop_gradient(w), l - jax.lax.stop_gradient(l)


def gold_losses(graphdef: nnx.GraphDef, params: Any, batch: Batch, *, beta: float, chunk: int = 0,
                response_len: int = 0, attention: str = "einsum") -> jax.Array:  # fmt: skip
    """Per-pair logistic preference loss of the gold set at theta_ref: float32[B], 0 for non-gold pairs.

    Retained pairs count as stored (y_w over y_l), inverted pairs flipped (y_l over y_w).
    """
    rw, rl = _ratios(graphdef, params, batch, chunk, response_len, attention)
    cat = batch["category"]
    margin = jnp.where(cat == INVERT, rl - rw, rw - rl)
    gold = (cat == RETAIN) | (cat == INVERT)
    return jnp.where(gold, -jax.nn.log_sigmoid(beta * margin), 0.0)


def conflict_losses(graphdef: nnx.GraphDef, params: Any, batch: Batch, *, beta: float, invert_loss: InvertLoss = "logistic",
                    chunk: int = 0, response_len: int = 0, attention: str = "einsum") -> jax.Array:  # fmt: skip
    """Per-pair TRACE term of each conflicting pair at theta_ref: float32[B], 0 for retained / PAD pairs."""
    rw, rl = _ratios(graphdef, params, batch, chunk, response_len, attention)
    cat = batch["category"]
    inv = invert_losses(rw, rl, beta=beta, kind=invert_loss)
    sup = dual_npo_losses(rw, rl, beta=beta)
    return jnp.where(cat == INVERT, inv, jnp.where(cat == SUPPRESS, sup, 0.0))


def jvp_scores(loss_vec: Callable[[Any, Batch], jax.Array], params: Any, batch: Batch, direction: Any) -> jax.Array:
    """[<g_i, direction>]_i for every pair of ``batch``: ONE forward-mode JVP of the loss vector. float32[B]."""
    _, tangent = jax.jvp(lambda p: loss_vec(p, batch), (params,), (direction,))
    return tangent


def explicit_scores(loss_vec: Callable[[Any, Batch], jax.Array], params: Any, batch: Batch, direction: Any) -> jax.Array:
    """The reference: every per-pair gradient g_i materialised by ``vmap(grad)``, then dotted. float32[B]."""
    b = batch["category"].shape[0]
    grads = per_pair_gradients(loss_vec, params, batch)
    dots = jax.tree.map(lambda g, d: jnp.sum(g.reshape(b, -1) * d.reshape(1, -1), axis=1), grads, direction)
    return sum(jax.tree.leaves(dots))


def per_pair_gradients(loss_vec: Callable[[Any, Batch], jax.Array], params: Any, batch: Batch) -> Any:
    """Every pair's gradient, stacked on a leading [B] axis of each parameter (``vmap(grad)``)."""
    b = batch["category"].shape[0]
    rows = batch["tokens"].shape[0] // b  # 2 (separate) or 1 (shared prompt)
    per_pair = {k: (v.reshape((b, rows) + v.shape[1:]) if k != "category" else v.reshape(b, 1)) for k, v in batch.items()}
    return jax.vmap(jax.grad(lambda p, pair: loss_vec(p, pair)[0]), in_axes=(None, 0))(params, per_pair)


_STATIC = ("graphdef", "beta", "invert_loss", "chunk", "response_len", "attention")


def _gold_grad_sum(params: Any, batch: Batch, *, graphdef: nnx.GraphDef, beta: float, invert_loss: InvertLoss = "logistic",
                   chunk: int = 0, response_len: int = 0, attention: str = "einsum") -> Any:  # fmt: skip
    """Gradient of the SUM of the batch's gold losses."""
    del invert_loss  # the gold loss is always logistic; the argument keeps one static signature
    loss = lambda p: jnp.sum(gold_losses(graphdef, p, batch, beta=beta, chunk=chunk, response_len=response_len, attention=attention))  # noqa: E731
    return jax.grad(loss)(params)


def _conflict_scores(params: Any, batch: Batch, direction: Any, *, graphdef: nnx.GraphDef, beta: float,
                     invert_loss: InvertLoss = "logistic", chunk: int = 0, response_len: int = 0,
                     attention: str = "einsum") -> jax.Array:  # fmt: skip
    """[<g_i, direction>]_i of the conflict terms by one JVP: float32[B], 0 for retained / PAD."""
    fn = lambda p, b: conflict_losses(graphdef, p, b, beta=beta, invert_loss=invert_loss, chunk=chunk, response_len=response_len,  # noqa: E731
                                      attention=attention)  # fmt: skip
    return jvp_scores(fn, params, batch, direction)


conflict_scores = jax.jit(_conflict_scores, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC)
def explicit_conflict_scores(params: Any, batch: Batch, direction: Any, *, graphdef: nnx.GraphDef, beta: float,
                             invert_loss: InvertLoss = "logistic", chunk: int = 0, response_len: int = 0,
                             attention: str = "einsum") -> jax.Array:  # fmt: skip
    """``conflict_scores`` through materialised per-pair gradients (``vmap(grad)``): the reference."""
    fn = lambda p, b: conflict_losses(graphdef, p, b, beta=beta, invert_loss=invert_loss, chunk=chunk, response_len=response_len,  # noqa: E731
                                      attention=attention)  # fmt: skip
    return explicit_scores(fn, params, batch, direction)


@dataclasses.dataclass(frozen=True)
class OnMesh:
    """The two impact programs jitted on a device mesh, as the train step is.

    Parameters and g_J in their declared shardings (``model.param_shardings``: FSDP / tensor parallel
    per ``mesh.rules``), pair rows over the batch axes, activations constrained by the model's logical
    axes, the per-pair scores replicated so every process reads them. ``params``: the parameters
    placed in those shardings. Works single- and multi-process (every process passes the same
    host batches).
    """

    mesh: Mesh
    params: Any
    gold_grad_sum: Callable[[Any, Batch], Any]
    conflict_scores: Callable[[Any, Batch, Any], jax.Array]
    batch_shardings: dict[str, NamedSharding]

    def place(self, batch: Batch) -> Batch:
        """A host (or single-device) batch as global arrays in ``batch_shardings``."""
        return {k: sharding.to_global(np.asarray(batch[k]), sh) for k, sh in self.batch_shardings.items()}


def on_mesh(graphdef: nnx.GraphDef, params: Any, batch_keys: Iterable[str], mesh: Mesh | None = None,
            rules: sharding.Rules | None = None, **static: Any) -> OnMesh:  # fmt: skip
    """``OnMesh`` for batches holding ``batch_keys`` (``category`` and the row arrays). mesh None: one
    device; rules None: ``fsdp_tp``. static: beta, invert_loss, chunk, response_len, attention."""
    from tracealign_jax.config import MeshConfig
    from tracealign_jax.model import param_shardings

    if mesh is None:
        mesh = sharding.build_mesh(MeshConfig(data=1), jax.devices()[:1])
    rules = sharding.resolve_rules("fsdp_tp" if rules is None else rules)
    p_sh = param_shardings(params, mesh, rules)
    rows = sharding.named_sharding(mesh, rules, ("batch", "length"))
    b_sh = {k: sharding.named_sharding(mesh, rules, ("batch",)) if k == "category" else rows for k in batch_keys}

    def in_mesh(fn: Callable) -> Callable:
        def run(*args: Any) -> Any:
            with sharding.use_mesh(mesh, rules):
                return fn(*args, graphdef=graphdef, **static)

        return run

    placed = jax.tree.map(lambda x, sh: x if getattr(x, "sharding", None) == sh else sharding.to_global(np.asarray(x), sh),
                          params, p_sh)  # fmt: skip
    return OnMesh(mesh, placed, jax.jit(in_mesh(_gold_grad_sum), in_shardings=(p_sh, b_sh), out_shardings=p_sh),
                  jax.jit(in_mesh(_conflict_scores), in_shardings=(p_sh, b_sh, p_sh), out_shardings=NamedSharding(mesh, PartitionSpec())),
                  b_sh)  # fmt: skip


def gold_gradient(graphdef: nnx.GraphDef, params: Any, batches: Iterable[Batch], *, beta: float, chunk: int = 0,
                  response_len: int = 0, attention: str = "einsum", mesh: Mesh | None = None,
                  rules: sharding.Rules | None = None, progress: bool = False) -> Any:  # fmt: skip
    """g_J = d/dtheta of (sum of gold losses over every batch) / (number of gold pairs), at ``params``.

    One jitted ``grad`` per batch holding a gold pair (``on_mesh``), accumulated in float32 in the
    parameters' shardings, so the gold set can be any size.
    """
    batches = list(batches)
    prog = on_mesh(graphdef, params, batches[0].keys() if batches else (), mesh, rules, beta=beta, chunk=chunk,
                   response_len=response_len, attention=attention)  # fmt: skip
    return _gold_gradient(prog, batches, response_len, progress)


def _gold_gradient(prog: OnMesh, batches: list[Batch], response_len: int, progress: bool) -> Any:
    total, n_gold = None, 0
    for b in tqdm(batches, desc="impact: gold gradient", unit="batch", disable=not progress):
        cat = np.asarray(b["category"])
        gold = int(np.sum((cat == RETAIN) | (cat == INVERT)))
        if not gold:  # suppressed / PAD pairs only: contributes nothing
            continue
        n_gold += gold
        check_response_len(b, response_len)
        g = prog.gold_grad_sum(prog.params, prog.place(b))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    if total is None:
        raise ValueError("impact: the gold set (retained + inverted pairs) is empty")
    return jax.tree.map(lambda x: x / n_gold, total)


def check_response_len(batch: Batch, response_len: int) -> None:
    """Refuses a batch with a row of more response tokens than ``response_len`` (> 0) slots would score."""
    most = int(np.asarray(batch["loss_mask"] > 0).sum(axis=1).max()) if response_len else 0
    if most > response_len:
        raise ValueError(f"impact: a row holds {most} response tokens, more than response_len={response_len}")


def impact_weights(scores_N: np.ndarray, category_N: np.ndarray, gamma: float = 1.0) -> dict[str, np.ndarray]:
    """From raw scores <g_J, g_i> to TRACE weights over the conflicting pairs.

    Returns float64[N] arrays: ``raw`` = max(0, s_i) / gamma on conflicts (0 elsewhere); ``weight`` =
    raw L1-normalised over conflicts (sums to 1; uniform if every raw weight is 0); ``weight_mean1`` =
    weight x N_conflicts, the per-pair weight ``objective.trace_objective`` takes.
    """
    if not gamma > 0:
        raise ValueError(f"impact gamma must be > 0, got {gamma}")
    s = np.asarray(scores_N, np.float64)
    conf = np.isin(np.asarray(category_N), (INVERT, SUPPRESS))
    raw = np.where(conf, np.maximum(s, 0.0) / gamma, 0.0)
    n_conf = int(conf.sum())
    total = raw.sum()
    if n_conf == 0:
        weight = np.zeros_like(raw)
    elif total > 0:
        weight = raw / total
    else:
        weight = conf / n_conf
    return {"raw": raw, "weight": weight, "weight_mean1": weight * n_conf}


def impact_scores(graphdef: nnx.GraphDef, params: Any, batches: list[Batch], *, beta: float = 0.3,
                  invert_loss: InvertLoss = "logistic", chunk: int = 0, response_len: int = 0,
                  attention: str = "einsum", mesh: Mesh | None = None, rules: sharding.Rules | None = None,
                  progress: bool = False) -> np.ndarray:  # fmt: skip
    """<g_J, g_i> for every pair of ``batches`` (in order, PAD pairs dropped): float32[N].

    Two passes with one compile each (fixed batch shape) on ``mesh`` (``on_mesh``): accumulate g_J
    over the batches holding a gold pair, then one JVP per batch holding a conflict (a batch of
    retained pairs only scores 0 without running). Peak memory: one batch's forward + tangent, plus
    g_J (one parameter copy, sharded like the parameters), whatever the number of pairs.
    """
    keys = batches[0].keys() if batches else ()
    prog = on_mesh(graphdef, params, keys, mesh, rules, beta=beta, invert_loss=invert_loss, chunk=chunk,
                   response_len=response_len, attention=attention)  # fmt: skip
    g_j = _gold_gradient(prog, batches, response_len, progress)
    out = []
    for b in tqdm(batches, desc="impact: <g_J, g_i>", unit="batch", disable=not progress):
        cat = np.asarray(b["category"])
        if np.isin(cat, (INVERT, SUPPRESS)).any():
            check_response_len(b, response_len)
            s = np.asarray(prog.conflict_scores(prog.params, prog.place(b), g_j))
        else:
            s = np.zeros(cat.shape, np.float32)
        out.append(s[cat != PAD])
    return np.concatenate(out) if out else np.zeros(0, np.float32)
