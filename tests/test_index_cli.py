"""`tracealign index build/query` end to end with a locally trained BPE tokenizer (no network)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tracealign_jax import cli
from tracealign_jax.atomic_io import IntegrityError
from tracealign_jax.index import TraceIndex
from tracealign_jax.index.corpus import tokenizer_fingerprint

WORDS = "the cat sat on a mat with bomb recipe mix powder fuse safe kitchen bake bread flour water".split()


def _tokenizer(directory, texts, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(directory))
    return tok


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(120)]
    tok = _tokenizer(root / "tok", texts, 80)
    with open(root / "a.jsonl", "w") as f:
        for i, t in enumerate(texts[:80]):
            f.write(json.dumps({"text": t, "unsafe": "bomb" in t, "category": "weapons" if "bomb" in t else "none",
                                "id": i}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts[80:], "risk": [0.3] * 40, "category": ["misc"] * 40}), root / "b.parquet")
    return root, texts, tok


def test_build_and_query(corpus, capsys):
    root, texts, tok = corpus
    argv = ["index", "build", "--corpus", str(root / "a.jsonl"), str(root / "b.parquet"),
            "--tokenizer", str(root / "tok"), "--out", str(root / "idx"), "--shard-tokens", "300", "--quiet"]
    assert cli.main(argv) == 0
    summary = capsys.readouterr().out
    assert "120 docs" in summary and "bytes/token" in summary and "M tok/s" in summary
    ix = TraceIndex.open(root / "idx", expected_tokenizer_hash=tokenizer_fingerprint(root / "tok")[1], verify="full")
    docs = [tok.encode(t).ids for t in texts]  # the tokenizers library itself, not our batched path
    assert ix.num_docs == 120 and ix.num_tokens == sum(map(len, docs)) and ix.num_shards > 1
    assert [ix.doc_tokens(d).tolist() for d in range(120)] == docs
    assert ix.doc_metadata([0])[0]["source"] == "a.jsonl:1" and ix.doc_metadata([119])[0]["source"] == "b.parquet:40"
    assert ix.doc_unsafe([80, 81]).tolist() == [0.3, 0.3]
    assert ix.doc_unsafe(range(80)).tolist() == [float("bomb" in t) for t in texts[:80]]
    assert ix.tokenizer_dir is not None and tokenizer_fingerprint(ix.tokenizer_dir)[1] == ix.tokenizer_hash

    phrase = " ".join(texts[7].split()[1:3])
    q = tok.encode(phrase).ids
    naive = sum(1 for d in docs for i in range(len(d)) if d[i:i + len(q)] == q)
    assert naive > 0
    assert cli.main(["index", "query", str(root / "idx"), "count", "--text", phrase]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"tokens": q, "count": naive}
    assert cli.main(["index", "query", str(root / "idx"), "locate", "--tokens", ",".join(map(str, q)),
                     "--limit", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["occurrences"]) == min(3, naive)
    for occ in out["occurrences"]:
        assert docs[occ["doc_id"]][occ["offset"]:occ["offset"] + len(q)] == q
        assert occ["metadata"]["doc_id"] == occ["doc_id"]
    assert cli.main(["index", "query", str(root / "idx"), "maximal", "--text", "the cat " + phrase + " zzz",
                     "--verify", "full"]) == 0
    spans = json.loads(capsys.readouterr().out)["spans"]
    assert spans and all(s["count"] == ix.count(s["span_tokens"]) > 0 for s in spans)
    assert cli.main(["index", "query", str(root / "idx"), "next", "--tokens", str(q[0])]) == 0
    nxt = json.loads(capsys.readouterr().out)["next"]
    assert sum(nxt.values()) == sum(1 for d in docs for i in range(len(d) - 1) if d[i] == q[0])


def test_tokenizer_mismatch_and_bad_records(corpus, tmp_path, capsys):
    root, texts, _ = corpus
    if not (root / "idx").exists():
        pytest.skip("needs test_build_and_query's index")
    _tokenizer(tmp_path / "other", texts, 60)
    with pytest.raises(IntegrityError, match="tokenizer"):
        TraceIndex.open(root / "idx", expected_tokenizer_hash=tokenizer_fingerprint(tmp_path / "other")[1])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "a cat", "unsafe": True}) + "\n"
                                        + json.dumps({"text": "a mat", "category": "x"}) + "\n")
    argv = ["index", "build", "--corpus", str(tmp_path / "bad.jsonl"), "--tokenizer", str(root / "tok"),
            "--out", str(tmp_path / "bad_idx"), "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: unsafe/risk: missing policy label" in err
    assert not (tmp_path / "bad_idx").exists()
    assert cli.main(argv[:-1] + ["--out", str(root / "idx"), "--quiet"]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    np.testing.assert_equal(TraceIndex.open(root / "idx").num_docs, 120)
