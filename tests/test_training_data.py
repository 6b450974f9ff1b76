"""Preference data: validation errors name file/line/field, chat templates, truncation, cache,
deterministic resumable batching, BCI arrays placed on response tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tracealign_jax.config import DataConfig
from tracealign_jax.records import RecordError
from tracealign_jax.pairs import load_pairs
from tracealign_jax.training.data import BatchStream, build_batch, epoch_batches

from tests.hf_tiny import save_word_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    words = ["<user>", "<assistant>", "<system>", "<end>"] + "how do i bake bread mix flour and water no thanks sure here is a recipe".split()
    return save_word_tokenizer(tmp_path_factory.mktemp("tok"), words, CHAT_TEMPLATE)


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_malformed_record_names_file_line_field(tmp_path):
    p = _write(tmp_path / "p.jsonl", [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]},
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]},
        {"prompt_ids": [1, 2], "chosen_ids": [3]},
        {"prompt_ids": [1], "chosen_ids": "oops", "rejected_ids": [4]},
        "{not json",
    ])  # fmt: skip
    with pytest.raises(RecordError) as err:
        load_pairs(DataConfig(train_path=str(p)))
    assert err.value.line == 3 and err.value.field == "rejected_ids" and str(p) in str(err.value)
    pairs = load_pairs(DataConfig(train_path=str(p), skip_malformed=True))
    assert len(pairs) == 2 and pairs.num_skipped == 3


def test_strings_chat_template_and_truncation(tmp_path, tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    p = _write(tmp_path / "p.jsonl", [
        {"prompt": "how do i bake bread", "chosen": "mix flour and water", "rejected": "no thanks"},
        {"prompt": [{"role": "user", "content": "how do i bake bread"}], "chosen": "sure here is a recipe",
         "rejected": [{"role": "assistant", "content": "no thanks"}]},
    ])  # fmt: skip
    cfg = DataConfig(train_path=str(p), tokenizer_dir=str(tokenizer_dir), max_prompt_len=4, max_response_len=3)
    pairs = load_pairs(cfg)
    ids = lambda s: tok.convert_tokens_to_ids(s.split())  # noqa: E731
    # Strings: BOS + prompt, keep_end truncation keeps the 4 tokens next to the response.
    assert pairs.get("prompt", 0).tolist() == ids("do i bake bread")
    assert pairs.get("chosen", 0).tolist() == ids("mix flour and")  # response keeps its start (EOS cut)
    assert pairs.get("rejected", 0).tolist() == ids("no thanks <eos>")
    # Chat: prompt = template with the generation prompt; response = what the template adds after it.
    assert pairs.get("prompt", 1).tolist() == ids("bake bread <end> <assistant>")
    assert pairs.get("chosen", 1).tolist() == ids("sure here is")
    assert pairs.get("rejected", 1).tolist() == ids("no thanks <end>")
    # Cuts are counted per field and said on stderr, naming the limit to raise.
    assert pairs.num_truncated == {"prompt": 2, "chosen": 2, "rejected": 0}
    err = capsys.readouterr().err
    assert "2 of 2 chosen texts are cut to data.max_response_len=3" in err and "rejected" not in err
    start = load_pairs(DataConfig(**{**cfg.__dict__, "truncation": "keep_start"}))
    assert start.get("prompt", 0).tolist() == ids("<bos> how do i")


def test_tokenization_cache_is_reused_and_invalidated(tmp_path, tokenizer_dir, monkeypatch):
    """The datasets.map Arrow cache: a second load tokenizes nothing; new data or a new tokenizer re-tokenize."""
    import shutil

    from tracealign_jax import pairs as pairs_mod

    calls = []
    segments = pairs_mod._segments
    monkeypatch.setattr(pairs_mod, "_segments", lambda *a: calls.append(a[2]) or segments(*a))
    rec = {"prompt": "how do i bake bread", "chosen": "mix flour and water", "rejected": "no thanks"}
    p = _write(tmp_path / "p.jsonl", [rec] * 3)
    tok_dir = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok_dir)
    cfg = DataConfig(train_path=str(p), tokenizer_dir=str(tok_dir), cache_dir=str(tmp_path / "cache"))
    a = load_pairs(cfg)
    assert calls == [1, 2, 3]
    (cached,) = (tmp_path / "cache").glob("tokens-*")
    assert cached.name == f"tokens-{a.fingerprint}" and (cached / "tokens.arrow").is_file()
    mtime = (cached / "tokens.arrow").stat().st_mtime_ns
    b = load_pairs(cfg)
    assert calls == [1, 2, 3] and (cached / "tokens.arrow").stat().st_mtime_ns == mtime  # read back, not re-tokenized
    assert a.fingerprint == b.fingerprint and all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    _write(p, [rec] * 4)
    c = load_pairs(cfg)
    assert c.fingerprint != a.fingerprint and len(c) == 4 and len(calls) == 7
    # Another tokenizer (same directory, "bread" now has another id): new fingerprint, new token ids.
    vocab_file = tok_dir / "tokenizer.json"
    vocab_file.write_text(vocab_file.read_text().replace('"bread": 12', '"bread": 99'))
    d = load_pairs(cfg)
    assert d.fingerprint != c.fingerprint and len(calls) == 11
    assert c.get("prompt", 0)[-1] == 12 and d.get("prompt", 0)[-1] == 99
    assert len(list((tmp_path / "cache").glob("tokens-*"))) == 3


def test_epoch_batches_are_deterministic_bucketed_and_resumable(tmp_path):
    rng = np.random.default_rng(0)
    recs = [{"prompt_ids": rng.integers(1, 50, int(rng.integers(1, 20))).tolist(), "chosen_ids": [1] * int(rng.integers(1, 9)),
             "rejected_ids": [2] * int(rng.integers(1, 9))} for _ in range(40)]  # fmt: skip
    p = _write(tmp_path / "p.jsonl", recs)
    cfg = DataConfig(train_path=str(p), max_prompt_len=16, max_response_len=8, buckets=(16, 32), shuffle_seed=3)
    pairs = load_pairs(cfg)
    s1 = BatchStream(pairs, cfg, 4)
    first = [next(s1) for _ in range(25)]  # crosses an epoch boundary
    for b in first:
        total = b["valid"].sum(1)
        assert b["tokens"].shape[1] in (16, 32) and total.max() <= b["tokens"].shape[1]
        if b["tokens"].shape[1] == 32:
            assert any(pairs.lengths("prompt")[i] + max(pairs.lengths("chosen")[i], pairs.lengths("rejected")[i]) > 16 for i in b["index"])
    e0 = np.concatenate([b["index"] for b in first[: len(epoch_batches(s1.bucket_N, 4, 3, 0))]])
    assert len(set(e0.tolist())) == len(e0)  # no example twice within an epoch
    s2 = BatchStream(pairs, cfg, 4)
    for _ in range(7):
        next(s2)
    s3 = BatchStream(pairs, cfg, 4)
    s3.restore(json.loads(json.dumps(s2.position())))
    for b in first[7:]:
        assert np.array_equal(next(s3)["tokens"], b["tokens"])
    other = BatchStream(pairs, DataConfig(**{**cfg.__dict__, "shuffle_seed": 4}), 4)
    assert not all(np.array_equal(next(other)["index"], b["index"]) for b in first[:5])


def test_batch_layout_and_bci_from_tensorstore(tmp_path):
    from tracealign_jax.response_store import ResponseArrayReader, write_response_arrays

    recs = [{"prompt_ids": [7, 8], "chosen_ids": [1, 2, 3], "rejected_ids": [4, 5]},
            {"prompt_ids": [9], "chosen_ids": [6], "rejected_ids": [3, 3, 3, 3]}]  # fmt: skip
    p = _write(tmp_path / "p.jsonl", recs)
    pairs = load_pairs(DataConfig(train_path=str(p), max_response_len=3))
    write_response_arrays(str(tmp_path / "bci"), [(np.array([0, 5, 0], np.float32), np.array([9, 9], np.float32)),
                                           (np.array([1], np.float32), np.array([2, 2, 2, 2], np.float32))])  # fmt: skip
    b = build_batch(pairs, np.array([1, 0]), 8, bci=ResponseArrayReader(str(tmp_path / "bci")))
    assert b["tokens"].tolist() == [[9, 6, 0, 0, 0, 0, 0, 0], [9, 3, 3, 3, 0, 0, 0, 0],
                                    [7, 8, 1, 2, 3, 0, 0, 0], [7, 8, 4, 5, 0, 0, 0, 0]]  # fmt: skip
    assert b["loss_mask"].tolist()[1] == [0, 1, 1, 1, 0, 0, 0, 0]
    assert b["bci"].tolist()[1] == [0, 2, 2, 2, 0, 0, 0, 0]  # 4th BCI value dropped with the truncated token
    assert b["bci"].tolist()[2] == [0, 0, 0, 5, 0, 0, 0, 0] and b["bci"].tolist()[3] == [0, 0, 9, 9, 0, 0, 0, 0]
    assert b["valid"].sum(1).tolist() == [2, 4, 5, 4] and b["index"].tolist() == [1, 0]
