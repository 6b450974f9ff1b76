"""Beam search, greedy and the veto hook against brute-force enumeration on a tiny vocabulary.

The toy model's next-token distribution depends on the whole history (a running hash), so beams
that share a last token still differ, and a wrong state gather on reorder changes the answer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoding_toy import DictVetoTable, HashedLM, brute_force, dict_lookup, isclose, prompt_arrays, vetoed

from tracealign_jax.decoding.beam_search import beam_search
from tracealign_jax.decoding.sampling import greedy, sample
from tracealign_jax.decoding.veto_hook import VetoSpec, make_veto_hook

EOS = 0
PROMPTS = [[5, 3, 2], [1], [2, 2, 1, 3]]
C = 3


@functools.partial(jax.jit, static_argnames=("k", "max_new", "spec", "refusal", "early_stop"))
def _beam_jit(lm_table, h, last, ctx, ctx_len, table, alpha, *, k, max_new, spec, refusal=(), early_stop=True):
    hook = make_veto_hook(spec, table, dict_lookup)
    return beam_search(
        functools.partial(HashedLM.tokens_to_logits, lm_table), h, last, ctx, ctx_len, num_beams=k, max_new_tokens=max_new, eos_id=EOS,
        alpha=alpha, logits_hook=hook, refusal=refusal, early_stop=early_stop,
    )


def _beam(lm, h, last, ctx, ctx_len, table, *, alpha, **kw):
    return _beam_jit(jnp.asarray(lm.table), h, last, ctx, ctx_len, table, jnp.float32(alpha), **kw)


def _greedy(lm, args, hook_args=None, **kw):
    return _greedy_jit(jnp.asarray(lm.table), *args, hook_args, **kw)


@functools.partial(jax.jit, static_argnames=("max_new", "spec", "refusal"))
def _greedy_jit(lm_table, h, last, ctx, ctx_len, table, *, max_new, spec=VetoSpec(), refusal=()):
    hook = make_veto_hook(spec, table, dict_lookup)
    return greedy(functools.partial(HashedLM.tokens_to_logits, lm_table), h, last, ctx, ctx_len,
                  max_new_tokens=max_new, eos_id=EOS, logits_hook=hook, refusal=refusal)


def _sequences(out, row):
    seqs = []
    for j in range(out.scores_BxK.shape[1]):
        if bool(out.valid_BxK[row, j]):
            n = int(out.lengths_BxK[row, j])
            seqs.append((float(out.scores_BxK[row, j]), tuple(int(x) for x in out.tokens_BxKxT[row, j, :n])))
    return seqs


def _assert_same(got, want):
    assert [s for _, s in got] == [s for _, s in want], (got, want)
    for (a, _), (b, _) in zip(got, want):
        assert isclose(a, b)


EMPTY = DictVetoTable.build({(9,): {9: 1.0}}, C)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_search_equals_brute_force(alpha):
    # vocab 4 (3 non-EOS) and 4 new tokens: 27 beams keep every prefix, so beam search is exact.
    lm = HashedLM(vocab=4, seed=1, eos_bias=0.5)
    k, max_new = 27, 4
    out = _beam(lm, *prompt_arrays(lm, PROMPTS, C), EMPTY, k=k, max_new=max_new, alpha=alpha, spec=VetoSpec())
    for row, prompt in enumerate(PROMPTS):
        _assert_same(_sequences(out, row), brute_force(lm, prompt, max_new, EOS, alpha, k))
    assert int(out.vetoes_BxK.sum()) == 0 and not bool(out.refused_BxK.any())


def test_early_termination_is_exact_and_fires():
    # A likely EOS and few beams: the search stops early, yet returns exactly what running every
    # step returns. The inverted test of the old Flax beam search (transformers#20901) fails this.
    lm = HashedLM(vocab=6, seed=10, eos_bias=4.0)
    prompts = [[1], [2, 3], [4, 4, 1], [5, 2], [3], [1, 1, 2, 3]]
    args = prompt_arrays(lm, prompts, C)
    for alpha in (0.0, 0.6, 1.0):
        kw = dict(k=3, max_new=16, alpha=alpha, spec=VetoSpec())
        early = _beam(lm, *args, EMPTY, **kw)
        full = _beam(lm, *args, EMPTY, early_stop=False, **kw)
        assert int(early.steps) < 16 and int(full.steps) == 16
        for row in range(len(prompts)):
            _assert_same(_sequences(early, row), _sequences(full, row))


ENTRIES = {(3,): {1: 5.0, 2: 0.5}, (1, 2): {3: 4.0}, (2, 1): {1: 2.0, 2: 3.0}, (5,): {1: 9.0}}


@pytest.mark.parametrize("min_prefix", [1, 2])
def test_hard_veto_equals_brute_force_over_allowed(min_prefix):
    lm = HashedLM(vocab=4, seed=4, eos_bias=0.0)
    table = DictVetoTable.build(ENTRIES, C)
    k, max_new, alpha, tau = 27, 4, 0.6, 1.0
    spec = VetoSpec(mode="hard", tau=tau, min_prefix=min_prefix, context_len=C)
    out = _beam(lm, *prompt_arrays(lm, PROMPTS, C), table, k=k, max_new=max_new, alpha=alpha, spec=spec)
    allowed = lambda hist, tok: not vetoed(ENTRIES, C, min_prefix, tau, hist, tok)  # noqa: E731
    total_vetoes = 0
    for row, prompt in enumerate(PROMPTS):
        got = _sequences(out, row)
        _assert_same(got, brute_force(lm, prompt, max_new, EOS, alpha, k, allowed))
        for _, seq in got:  # no output contains a vetoed span
            assert all(allowed(list(prompt) + list(seq[:i]), seq[i]) for i in range(len(seq)))
        for j, (_, seq) in enumerate(got):  # the count is the vetoed expansions along this path
            want = sum(
                vetoed(ENTRIES, C, min_prefix, tau, list(prompt) + list(seq[:i]), tok)
                for i in range(len(seq)) for tok in range(lm.vocab)
            )
            assert int(out.vetoes_BxK[row, j]) == want
            total_vetoes += want
    assert total_vetoes > 0


def test_soft_veto_equals_brute_force_with_penalised_scores():
    lm = HashedLM(vocab=4, seed=5)
    table = DictVetoTable.build(ENTRIES, C)
    gamma, tau = 0.7, 1.0
    spec = VetoSpec(mode="soft", gamma=gamma, tau=tau, min_prefix=1, context_len=C)
    out = _beam(lm, *prompt_arrays(lm, PROMPTS, C), table, k=27, max_new=4, alpha=0.6, spec=spec)

    class Penalised(HashedLM):
        def step_logprobs(self, prompt, generated):
            lp = super().step_logprobs(prompt, generated).copy()
            hist = list(prompt) + list(generated)
            for tok in range(self.vocab):
                pens = [ENTRIES.get(tuple(hist[len(hist) - n :]), {}).get(tok) for n in range(1, min(C, len(hist)) + 1)]
                pmax = max([p for p in pens if p is not None], default=0.0)
                if pmax > tau:
                    lp[tok] -= gamma * pmax
            return lp

    pen_lm = Penalised(vocab=4, seed=5)
    for row, prompt in enumerate(PROMPTS):
        _assert_same(_sequences(out, row), brute_force(pen_lm, prompt, 4, EOS, 0.6, 27))


def test_all_vetoed_row_ends_with_refusal():
    # After prompt token 5 every token is vetoed: the row must end with the refusal, not vetoed text.
    lm = HashedLM(vocab=4, seed=6)
    table = DictVetoTable.build({(5,): {t: 9.0 for t in range(4)}}, C)
    spec = VetoSpec(mode="hard", tau=1.0, min_prefix=1, context_len=C)
    refusal = (3, 3, EOS)
    out = _beam(lm, *prompt_arrays(lm, PROMPTS[1:] + [[2, 5]], C), table, k=3, max_new=4, alpha=0.6,
                spec=spec, refusal=refusal)
    assert bool(out.refused_BxK[2, 0]) and int(out.lengths_BxK[2, 0]) == 3
    assert tuple(np.asarray(out.tokens_BxKxT[2, 0, :3])) == refusal
    assert int(out.vetoes_BxK[2, 0]) == 4
    assert not bool(out.refused_BxK[:2].any())
    gout = _greedy(lm, prompt_arrays(lm, PROMPTS[1:] + [[2, 5]], C), table, max_new=4, spec=spec, refusal=refusal)
    assert bool(gout.refused_BxK[2, 0]) and tuple(np.asarray(gout.tokens_BxKxT[2, 0, :3])) == refusal
    assert not bool(gout.refused_BxK[:2].any())


@pytest.mark.parametrize("use_veto", [False, True])
def test_greedy_equals_stepwise_argmax(use_veto):
    lm = HashedLM(vocab=6, seed=7)
    table = DictVetoTable.build({(3,): {2: 4.0}, (1, 2): {4: 4.0}}, C)
    spec = VetoSpec(mode="hard", tau=1.0, min_prefix=1, context_len=C) if use_veto else VetoSpec()
    out = _greedy(lm, prompt_arrays(lm, PROMPTS, C), table, max_new=8, spec=spec)
    for row, prompt in enumerate(PROMPTS):
        seq = []
        while len(seq) < 8:
            lp = lm.step_logprobs(prompt, seq).copy()
            if use_veto:
                for tok in range(6):
                    if vetoed({(3,): {2: 4.0}, (1, 2): {4: 4.0}}, C, 1, 1.0, list(prompt) + seq, tok):
                        lp[tok] = -np.inf
            seq.append(int(np.argmax(lp)))
            if seq[-1] == EOS:
                break
        n = int(out.lengths_BxK[row, 0])
        assert list(np.asarray(out.tokens_BxKxT[row, 0, :n])) == seq


def test_sampling_distribution_and_filters():
    # One step from a fixed state: empirical frequencies match the filtered distribution.
    lm = HashedLM(vocab=6, seed=8)
    prompt = [2, 4]
    n = 4000
    h, last, ctx, ctx_len = prompt_arrays(lm, [prompt] * n, C)
    lp = lm.step_logprobs(prompt, [])
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.5, 3, 1.0), (1.0, 0, 0.6)]:
        out = jax.jit(
            lambda *a, t=temperature, kk=top_k, p=top_p: sample(
                functools.partial(HashedLM.tokens_to_logits, jnp.asarray(lm.table)), *a, max_new_tokens=1, eos_id=EOS, rng=jax.random.key(3),
                temperature=t, top_k=kk, top_p=p,
            )
        )(h, last, ctx, ctx_len)
        counts = np.bincount(np.asarray(out.tokens_BxKxT[:, 0, 0]), minlength=6) / n
        logits = lp / temperature
        order = np.argsort(-logits)
        keep = np.zeros(6, bool)
        keep[order[: top_k or 6]] = True
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        mass = 0.0
        for i, tok in enumerate(order):
            if mass >= top_p:
                keep[tok] = False
            mass += probs[tok]
        want = np.where(keep, np.exp(logits), 0.0)
        want /= want.sum()
        np.testing.assert_allclose(counts, want, atol=0.03)
