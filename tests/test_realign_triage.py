"""Triage on a hand-built table of pairs (every label combination), the rules and provenance judges,
the label cache and the agreement report."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from tracealign_jax.realign import judge as J
from tracealign_jax.realign.triage import INVERT, RETAIN, SUPPRESS, summarize, triage_codes, triage_pairs

POLICY = textwrap.dedent(
    r"""
    policy: "Detonator construction is now forbidden. Medication dosage questions are now allowed."
    categories:
      - name: explosives
        rule: forbid
        patterns: ['\bdetonators?\b', '\bpipe bomb\b']
      - name: dosage
        rule: allow
        prompt_patterns: ['\bdosage\b', '\bhow much .* can i take\b']
    """
)

REFUSE = "I can't help with that."
# (prompt, y_w, y_l, expected category): the data's stored preference against the NEW policy.
TABLE = [
    # y_w compliant, y_l compliant -> retain
    ("Tell me about tides.", "Tides come from the moon's pull.", "Tides are magic.", "retain"),
    # y_w compliant, y_l non-compliant -> retain (the stored preference already agrees with the policy)
    ("How do I make a detonator?", REFUSE, "Wire the detonator to the cap like so.", "retain"),
    # y_w non-compliant, y_l compliant -> invert (a newly forbidden answer was preferred)
    ("Explain mining charges.", "A detonator is built from a blasting cap.", "Mining uses licensed crews; ask one.", "invert"),
    # y_w non-compliant (refuses a newly allowed request), y_l compliant -> invert
    ("What ibuprofen dosage is safe for adults?", REFUSE, "Usually 200-400 mg every 4-6 hours, at most 1200 mg a day.", "invert"),
    # both non-compliant -> suppress
    ("Build me something loud.", "Pack a pipe bomb with powder.", "Use two detonators in series.", "suppress"),
    # both non-compliant through the allow rule (both refuse) -> suppress
    ("How much acetaminophen can I take daily?", REFUSE, "I cannot help with medication questions.", "suppress"),
]


@pytest.fixture()
def rules(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return J.RulesJudge.from_yaml(path)


def test_triage_codes_cover_every_label_combination():
    w = np.array([True, True, False, False])
    l_ = np.array([True, False, True, False])
    assert triage_codes(w, l_).tolist() == [RETAIN, RETAIN, INVERT, SUPPRESS]
    with pytest.raises(ValueError, match="shape"):
        triage_codes(w, l_[:3])


def test_rules_judge_triages_the_hand_built_table(rules):
    prompts, chosen, rejected, want = zip(*TABLE)
    triaged = triage_pairs(prompts, chosen, rejected, rules)
    assert [t.category for t in triaged] == list(want)
    assert triaged[2].chosen_rule == "explosives" and "detonator" in triaged[2].chosen_evidence
    assert triaged[3].chosen_rule == "dosage" and "refuses" in triaged[3].chosen_evidence
    assert triaged[1].rejected_rule == "explosives" and triaged[1].chosen_compliant
    # a refusal of a prompt outside every allow rule is compliant
    assert rules.label("How do I make a detonator?", REFUSE).compliant
    s = summarize(triaged)
    assert s["counts"] == {"retain": 2, "invert": 2, "suppress": 2} and s["total"] == 6
    assert s["by_rule"]["invert"] == {"explosives": 1, "dosage": 1}
    assert s["examples"]["suppress"] == [4, 5]


@pytest.mark.parametrize("body,match", [
    ("policy: x\ncategories: []\n", "non-empty list"),
    ("policy: x\ncolour: red\ncategories: [{name: a, rule: forbid, patterns: [b]}]\n", "unknown key"),
    ("categories: [{name: a, rule: ban, patterns: [b]}]\n", "forbid | allow"),
    ("categories: [{name: a, rule: forbid, patterns: ['(']}]\n", r"categories\[0\] \(a\)\.patterns\[0\]"),
    ("categories: [{name: a, rule: allow}]\n", "prompt pattern"),
    ("categories: [{name: a, rule: forbid, patterns: [b], regex: c}]\n", "unknown key"),
])  # fmt: skip
def test_rules_file_errors_name_the_key(tmp_path, body, match):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ValueError, match=match):
        J.RulesJudge.from_yaml(path)


class CountingJudge:
    name = "counting"

    def __init__(self, inner):
        self.inner, self.calls, self.seen = inner, 0, 0

    def config(self):
        return self.inner.config()

    def label_batch(self, prompts, responses):
        self.calls += 1
        self.seen += len(responses)
        return self.inner.label_batch(prompts, responses)


def test_label_cache_reuses_labels_and_keys_on_the_judge_config(rules, tmp_path):
    prompts, chosen, _, _ = zip(*TABLE)
    inner = CountingJudge(rules)
    cached = J.CachedJudge(inner, tmp_path / "labels.jsonl")
    first = cached.label_batch(prompts, chosen)
    assert (cached.hits, cached.misses, inner.calls) == (0, 6, 1)
    again = J.CachedJudge(inner, tmp_path / "labels.jsonl")  # from the file
    assert again.label_batch(prompts, chosen) == first and (again.hits, inner.calls) == (6, 1)
    again.label_batch(list(prompts) + ["new prompt"], list(chosen) + ["new answer"])
    assert (again.misses, inner.calls, inner.seen) == (1, 2, 7)  # only the miss reached the judge
    rows = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and rows[0]["key"] == J.cache_key(rules.config(), prompts[0], chosen[0])
    # another policy never reads these labels
    other = J.RulesJudge("other", rules.categories[:1])
    assert J.cache_key(other.config(), prompts[0], chosen[0]) != rows[0]["key"]
    (tmp_path / "bad.jsonl").write_text('{"key": "a", "compliant": true}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        J.CachedJudge(rules, tmp_path / "bad.jsonl")


def test_agreement_counts_and_kappa():
    L = lambda *bits: [J.Label(bool(b)) for b in bits]  # noqa: E731
    rows = J.agreement({"a": L(1, 1, 1, 0, 0, 1), "b": L(1, 1, 0, 0, 1, 1), "c": L(1, 1, 1, 0, 0, 1)})
    ab = rows[0]
    assert (ab["a"], ab["b"], ab["n"]) == ("a", "b", 6)
    assert (ab["ok_ok"], ab["ok_bad"], ab["bad_ok"], ab["bad_bad"]) == (3, 1, 1, 1)
    po, pe = 4 / 6, (4 / 6) * (4 / 6) + (2 / 6) * (2 / 6)
    np.testing.assert_allclose(ab["kappa"], (po - pe) / (1 - pe), rtol=1e-12)
    assert rows[1]["b"] == "c" and rows[1]["agree"] == 1.0 and rows[1]["kappa"] == 1.0
    assert "| a | b | 6 | 0.667 |" in J.render_agreement(rows)
    with pytest.raises(ValueError, match="different numbers"):
        J.agreement({"a": L(1), "b": L(1, 0)})


def test_provenance_judge_marks_shield_refusals_non_compliant(tmp_path):
    from provenance_corpus import FORBIDDEN, benign_text, build
    from tracealign_jax.config import ProvenanceConfig
    from tracealign_jax.provenance.bci import BCIScorer
    from tracealign_jax.provenance.calibrate import calibrate
    from tracealign_jax.provenance.shield import TraceShield

    _, _, index = build(tmp_path)
    scorer = BCIScorer(index, ProvenanceConfig(min_span=3, sample_size=256))
    rng = np.random.default_rng(7)
    texts = [benign_text(rng, 30) for _ in range(200)]
    shield = TraceShield(index, scorer, calibrate(scorer, texts[:100], texts[100:], 0.0, confidence=0.0),
                         top_sources=1)
    judge = J.ProvenanceJudge(shield)
    responses, planted = [], []
    for i in range(6):
        mid = FORBIDDEN[i % 3] if i % 2 == 0 else benign_text(rng, 8)
        responses.append(np.concatenate([benign_text(rng, 5), mid, benign_text(rng, 5)]))
        planted.append(i % 2 == 0)
    labels = judge.label_batch([""] * 6, responses)
    assert [not x.compliant for x in labels] == planted
    assert all("BCI" in x.evidence and x.rule == "provenance" for x, p in zip(labels, planted) if p)
    assert judge.config()["tau"] == shield.threshold.tau
    # the provenance judge and a judge that sees the planted phrases agree on every response
    truth = [J.Label(not p) for p in planted]
    assert J.agreement({"provenance": labels, "truth": truth})[0]["kappa"] == 1.0


def _tiny_classifier(d):
    """A random tiny BERT sequence classifier with labels safe / unsafe and a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "grind", "the", "crystals", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(d)  # fmt: skip
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2,
                     id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1})  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(d)
    return d


def test_content_judges_as_policy_judges(tmp_path):
    exact = J.ContentPolicyJudge.exact({"s1": ["wire the detonator to the cap like so"]}, window=4)
    labels = exact.label_batch(["p", "p"], ["First, wire the detonator to the cap.", "Tides come from the moon."])
    assert [x.compliant for x in labels] == [False, True] and "detonator" in labels[0].evidence
    assert labels[0].rule == "exact" and exact.config()["window"] == 4
    # a local sequence-classification model: non-compliant iff P(unsafe) >= threshold
    pytest.importorskip("torch")
    d = _tiny_classifier(tmp_path / "clf")
    texts = ["grind the crystals", "hello world", "hello", "the the the crystals grind world"]
    probs = np.array(J.ContentPolicyJudge.classifier(d).content.probabilities(texts))
    thr = float(np.median(probs))
    clf = J.ContentPolicyJudge.classifier(d, threshold=thr)
    got = [x.compliant for x in clf.label_batch([""] * 4, texts)]
    assert got == [bool(p < thr) for p in probs] and any(got) and not all(got)
    assert clf.config() != J.ContentPolicyJudge.classifier(d).config()  # the threshold keys the cache too
