"""Faults where decoding meets provenance: how a refusal competes with allowed hypotheses (item 9),
checked against brute force on the hashed-history toy model, and vocabulary checks of a decode job."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoding_toy import DictVetoTable, HashedLM, brute_force, dict_lookup, isclose, prompt_arrays, vetoed

from tracealign_jax.decoding.beam_search import beam_search
from tracealign_jax.decoding.veto_hook import VetoSpec, make_veto_hook

EOS, C, TAU, ALPHA = 0, 3, 1.0, 0.6
REFUSAL = (3, 3, EOS)
# After token 5 only EOS and 1 are allowed; after (5, 1) nothing is: a beam that takes 1 must refuse.
# After 4 nothing at all is allowed: that row has no allowed hypothesis.
ENTRIES = {(5,): {2: 9.0, 3: 9.0}, (5, 1): {t: 9.0 for t in range(4)}, (4,): {t: 9.0 for t in range(4)}}
PROMPTS = [[2, 5], [1, 4], [3, 1]]


@functools.partial(jax.jit, static_argnames=("k", "max_new"))
def _beam(lm_table, h, last, ctx, ctx_len, table, *, k, max_new):
    spec = VetoSpec(mode="hard", tau=TAU, min_prefix=1, context_len=C)
    return beam_search(functools.partial(HashedLM.tokens_to_logits, lm_table), h, last, ctx, ctx_len, num_beams=k,
                       max_new_tokens=max_new, eos_id=EOS, alpha=ALPHA, logits_hook=make_veto_hook(spec, table, dict_lookup),
                       refusal=REFUSAL)  # fmt: skip


def _refusal_brute_force(lm, prompt, max_new):
    """The refusal exhaustive beam search produces: at the first step where every live (allowed, not
    ended) prefix has no allowed continuation, the best prefix + REFUSAL; None if that never happens."""
    allowed = lambda hist, tok: not vetoed(ENTRIES, C, 1, TAU, hist, tok)  # noqa: E731
    live = [((), 0.0)]
    for n in range(max_new):
        nxt = [(seq + (t,), lp + float(lm.step_logprobs(prompt, seq)[t]))
               for seq, lp in live for t in range(lm.vocab) if allowed(list(prompt) + list(seq), t)]
        if not nxt:
            seq, lp = max(live, key=lambda x: x[1])
            return lp / ((5.0 + n + len(REFUSAL)) / 6.0) ** ALPHA, seq + REFUSAL
        live = [(s, lp) for s, lp in nxt if s[-1] != EOS]
        if not live:
            return None
    return None


@pytest.mark.parametrize("k", [1, 2, 27])
def test_refusal_ranks_below_every_allowed_hypothesis(k):
    lm = HashedLM(vocab=4, seed=3, eos_bias=-3.0)  # EOS unlikely: a prefix + free refusal would score better
    table = DictVetoTable.build(ENTRIES, C)
    allowed = lambda hist, tok: not vetoed(ENTRIES, C, 1, TAU, hist, tok)  # noqa: E731
    max_new = 4
    out = _beam(jnp.asarray(lm.table), *prompt_arrays(lm, PROMPTS, C), table, k=k, max_new=max_new)
    for row, prompt in enumerate(PROMPTS):
        got = [(float(out.scores_BxK[row, j]), tuple(int(x) for x in out.tokens_BxKxT[row, j, : int(out.lengths_BxK[row, j])]),
                bool(out.refused_BxK[row, j])) for j in range(k) if bool(out.valid_BxK[row, j])]  # fmt: skip
        want = brute_force(lm, prompt, max_new, EOS, ALPHA, 27, allowed)
        refusal = _refusal_brute_force(lm, prompt, max_new)
        if k == 27:  # exhaustive: every allowed hypothesis, best first, then the refusal
            expect = [(sc, seq, False) for sc, seq in want] + ([(*refusal, True)] if refusal else [])
            assert [g[1:] for g in got] == [e[1:] for e in expect[:k]], (row, got, expect)
            assert all(isclose(a[0], b[0]) for a, b in zip(got, expect))
        if want:
            assert not got[0][2], f"row {row}: a refusal outranked an allowed hypothesis: {got}"
        else:
            assert got[0][2] and got[0][1][-len(REFUSAL):] == REFUSAL
    # the case of issue 17 item 9: row 0's refusal (prefix [1] + free refusal tokens) scores higher than
    # the only allowed output ([EOS]) and still loses to it
    refusal = _refusal_brute_force(lm, PROMPTS[0], max_new)
    best_allowed = brute_force(lm, PROMPTS[0], max_new, EOS, ALPHA, 1, allowed)[0]
    assert refusal is not None and refusal[0] > best_allowed[0]


def test_losses_say_cdpo_and_apply_it():
    """Issue 17 item 10: label_smoothing is cDPO's epsilon (documented, named), not TRL 1.16's ignored option."""
    from tracealign_jax.config import LossConfig
    from tracealign_jax.training import losses

    assert "TRL's formulas" not in losses.__doc__
    assert "cDPO" in losses.__doc__ and "ignores" in losses.__doc__ and "cDPO" in LossConfig.__doc__
    beta, eps = 0.1, 0.2
    pc, pr, rc, rr = (jnp.asarray([v], jnp.float32) for v in (-3.0, -7.0, -4.0, -5.0))
    loss, _ = losses.preference_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=beta, label_smoothing=eps)
    m = (-3.0 + 4.0) - (-7.0 + 5.0)
    cdpo = -(1 - eps) * np.log(1 / (1 + np.exp(-beta * m))) - eps * np.log(1 / (1 + np.exp(beta * m)))
    np.testing.assert_allclose(float(loss), cdpo, rtol=1e-6)


def test_decode_refuses_prompt_ids_and_veto_tables_beyond_the_model_vocabulary(tmp_path):
    """Issue 17 items 1, 2 at decode time: prompt ids, tokenizer and veto table must fit the model's vocabulary."""
    from tracealign_jax.config import ConfigError
    from tracealign_jax.decoding.job import _check_vocabularies, read_prompts
    from tracealign_jax.records import RecordError

    (tmp_path / "p.jsonl").write_text('{"prompt_ids": [1, 2]}\n{"prompt_ids": [3, 600]}\n')
    with pytest.raises(RecordError, match=r"p\.jsonl:2: prompt_ids: token id 600 >= the model's vocab_size 512"):
        read_prompts(tmp_path / "p.jsonl", None, 512)
    with pytest.raises(ConfigError, match="veto table built over 768 tokens, the model has 512"):
        _check_vocabularies(512, "", None, "vt", {"vocab_size": 768})
    _check_vocabularies(512, "", None, "vt", {"vocab_size": 512})
