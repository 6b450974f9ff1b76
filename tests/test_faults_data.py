"""Faults in training inputs (issue 17 items 1, 4, 5, 11): every bad record refused naming file, line and
field (or skipped and counted with data.skip_malformed), token ids beyond the model's vocabulary refused
before any step, and a per-token BCI / reference store built on another preference file refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _training_toy import toy_config, write_toy_preferences
from tracealign_jax.config import ConfigError, DataConfig
from tracealign_jax.records import RecordError
from tracealign_jax.pairs import TokenizedPairs, check_token_ids, load_pairs

GOOD = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + "how do i bake bread no thanks sure here".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(d)
    return d


def _write_bytes(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _line(rec) -> bytes:
    return json.dumps(rec).encode()


def test_invalid_utf8_names_file_and_line_and_is_skipped_on_request(tmp_path):
    p = _write_bytes(tmp_path / "p.jsonl", [_line(GOOD), b'{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "x": "\xff\xfe"}', _line(GOOD)])
    with pytest.raises(RecordError, match=rf"^{p}:2: not valid UTF-8 \(byte 0xff at byte column 67\)$"):
        load_pairs(DataConfig(train_path=str(p)))
    pairs = load_pairs(DataConfig(train_path=str(p), skip_malformed=True))
    assert len(pairs) == 2 and pairs.num_skipped == 1


def test_json_error_line_and_column(tmp_path):
    # A carriage return is JSON whitespace: the record is valid and must not shift later line numbers
    # (text-mode reading split the line there). Columns count characters, bytes are named too.
    p = _write_bytes(tmp_path / "p.jsonl", [b'{"prompt_ids": [1],\r "chosen_ids": [2], "rejected_ids": [3]}',
                                            '{"prompt": "h\u00e9", "chosen": }'.encode()])
    with pytest.raises(RecordError) as err:
        load_pairs(DataConfig(train_path=str(p)))
    assert err.value.line == 2 and "Expecting value at column 28, byte 29" in str(err.value)
    pairs = load_pairs(DataConfig(train_path=str(p), skip_malformed=True))
    assert len(pairs) == 1 and pairs.num_skipped == 1


@pytest.mark.parametrize(
    "record, field",
    [
        ({"chosen": "sure", "rejected": "no"}, "prompt"),
        ({"prompt": 7, "chosen": "sure", "rejected": "no"}, "prompt"),
        ({"prompt": "how", "chosen": "sure", "rejected": ""}, "rejected"),
        ({"prompt": "how", "chosen": "   ", "rejected": "no"}, "chosen"),
        ({"prompt": "how", "chosen": "sure", "rejected": None}, "rejected"),
        ({"prompt": "how", "chosen": ["sure"], "rejected": "no"}, "chosen"),
        ({"prompt": [{"role": "user", "content": "how"}], "chosen": "sure", "rejected": "no"}, "prompt"),  # no chat template
        ({"prompt": [{"role": "user"}], "chosen": "sure", "rejected": "no"}, "prompt[0]"),
        ({"prompt": "how", "chosen": "sure", "rejected": []}, "rejected"),
        ({"prompt_ids": [1], "chosen_ids": [2, -1], "rejected_ids": [3]}, "chosen_ids"),
        ({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [True]}, "rejected_ids"),
        ({"prompt_ids": [1], "chosen_ids": ["2"], "rejected_ids": [3]}, "chosen_ids"),
        ({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": []}, "rejected"),
        ({"prompt_ids": "1 2", "chosen_ids": [2], "rejected_ids": [3]}, "prompt_ids"),
        ([GOOD], None),
        ("not json at all", None),
    ],
)
def test_malformed_record_of_every_field_type(tmp_path, tokenizer_dir, record, field):
    body = record.encode() if isinstance(record, str) else _line(record)
    p = _write_bytes(tmp_path / "p.jsonl", [_line(GOOD), body, _line(GOOD)])
    cfg = DataConfig(train_path=str(p), tokenizer_dir=str(tokenizer_dir))
    with pytest.raises(RecordError) as err:
        load_pairs(cfg)
    assert (err.value.path, err.value.line, err.value.field) == (str(p), 2, field), str(err.value)
    pairs = load_pairs(DataConfig(**{**cfg.__dict__, "skip_malformed": True}))
    assert len(pairs) == 2 and pairs.num_skipped == 1


def test_token_ids_beyond_the_model_vocabulary_are_refused_before_training(tmp_path):
    from tracealign_jax.training.loop import train

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3, 700]}) + "\n")
    cfg = toy_config(data, tmp_path / "run", "train.steps=3")  # the toy model has 512 embedding rows
    with pytest.raises(RecordError, match=r"p\.jsonl:2: rejected: token id 700 >= the model's vocab_size 512"):
        train(cfg, show_progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tokenizer_larger_than_the_model_is_refused():
    pairs = TokenizedPairs({"prompt_tokens": np.array([1], np.int32), "prompt_offsets": np.array([0, 1]),
                            "chosen_tokens": np.array([2], np.int32), "chosen_offsets": np.array([0, 1]),
                            "rejected_tokens": np.array([3], np.int32), "rejected_offsets": np.array([0, 1]),
                            "line": np.array([1])}, tokenizer_vocab=768)  # fmt: skip
    with pytest.raises(ConfigError, match="the tokenizer has 768 tokens but the model's vocab_size is 512"):
        check_token_ids(pairs, 512, "p.jsonl", "the model's")
    check_token_ids(pairs, 768, "p.jsonl", "the model's")


def test_token_bci_store_of_another_preference_file_is_refused(tmp_path):
    from tracealign_jax.response_store import write_response_arrays as write_token_bci
    from tracealign_jax.training.loop import train

    data = write_toy_preferences(tmp_path / "prefs.jsonl", n=16)
    reversed_data = tmp_path / "reversed.jsonl"
    reversed_data.write_text("".join(reversed(data.read_text().splitlines(keepends=True))))
    built_on = load_pairs(DataConfig(train_path=str(data), max_prompt_len=16, max_response_len=16, buckets=(32,)))
    zeros = [(np.zeros(len(built_on.get("chosen", i)), np.float32), np.zeros(len(built_on.get("rejected", i)), np.float32))
             for i in range(len(built_on))]  # fmt: skip
    store = str(tmp_path / "bci")
    write_token_bci(store, zeros, meta={"tau": 1.0, "dataset": built_on.fingerprint, "dataset_identity": built_on.identity})
    cfg = toy_config(reversed_data, tmp_path / "run", f"data.bci_path={store}", "loss.cbd_data_weight=0.1", "train.steps=1")
    with pytest.raises(ConfigError, match=r"data\.bci_path .*: built on another dataset \(prefs\.jsonl\); differs in "
                                          r"preference file contents"):
        train(cfg, show_progress=False)
    # the same file under another name is the same dataset
    same = tmp_path / "copy.jsonl"
    same.write_bytes(data.read_bytes())
    pairs = load_pairs(DataConfig(train_path=str(same), max_prompt_len=16, max_response_len=16, buckets=(32,)))
    from tracealign_jax.pairs import check_same_dataset

    check_same_dataset({"dataset_identity": built_on.identity}, pairs, "store")
    longer = load_pairs(DataConfig(train_path=str(data), max_prompt_len=16, max_response_len=8, buckets=(32,)))
    with pytest.raises(ConfigError, match=r"data\.max_response_len \(16 vs now 8\)"):
        check_same_dataset({"dataset_identity": built_on.identity}, longer, "store")


def test_reference_store_of_another_preference_file_is_refused(tmp_path):
    from tracealign_jax.response_store import write_response_arrays as write_token_bci
    from tracealign_jax.training import reference

    data = write_toy_preferences(tmp_path / "prefs.jsonl", n=8)
    other = write_toy_preferences(tmp_path / "other.jsonl", n=8, seed=1)
    cfg = toy_config(data, tmp_path / "run", "loss.reference=precomputed", f"data.ref_logps_path={tmp_path / 'refs'}")
    pairs, other_pairs = load_pairs(cfg.data), load_pairs(DataConfig(**{**cfg.data.__dict__, "train_path": str(other)}))
    zeros = [(np.zeros(len(pairs.get("chosen", i)), np.float32), np.zeros(len(pairs.get("rejected", i)), np.float32))
             for i in range(len(pairs))]  # fmt: skip
    # a store copied (or keyed) to this dataset's place but computed for the other file
    write_token_bci(reference.store_path(cfg, pairs), zeros,
                    meta={"kind": "reference_logps", "dataset": other_pairs.fingerprint, "dataset_identity": other_pairs.identity})
    with pytest.raises(ConfigError, match=r"data\.ref_logps_path .*built on another dataset \(other\.jsonl\)"):
        reference.open_reference(cfg, pairs)


def test_a_flipped_byte_in_a_token_array_store_is_refused(tmp_path):
    """Per-token BCI / reference log-prob stores carry a crc32c per chunk: a flipped byte fails the read."""
    from tracealign_jax.atomic_io import IntegrityError
    from tracealign_jax.response_store import ResponseArrayReader as TokenBCIReader
    from tracealign_jax.response_store import write_response_arrays as write_token_bci

    examples = [(np.arange(5, dtype=np.float32) + i, np.arange(3, dtype=np.float32)) for i in range(6)]
    write_token_bci(str(tmp_path / "bci"), examples)
    assert TokenBCIReader(str(tmp_path / "bci")).read([2])[0][0].tolist() == [2, 3, 4, 5, 6]
    chunk = next(p for p in (tmp_path / "bci" / "chosen").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunk.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=r"corrupted chunk .*Digest mismatch"):
        TokenBCIReader(str(tmp_path / "bci")).read([2])


def test_training_refuses_provenance_artifacts_of_another_tokenizer(tmp_path, tokenizer_dir):
    """Issue 17 item 2 in training: a BCI store / veto table records the index tokenizer and vocabulary."""
    from tracealign_jax.index.corpus import tokenizer_fingerprint
    from tracealign_jax.training.loop import _check_tokenizers

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    cfg = toy_config(data, tmp_path / "run", f"data.tokenizer_dir={tokenizer_dir}")
    pairs = load_pairs(DataConfig(train_path=str(data)))
    ours = tokenizer_fingerprint(tokenizer_dir)[1]
    _check_tokenizers(cfg, pairs, 512, {"loss.cbd_veto_table": {"tokenizer_hash": ours, "vocab_size": 12}})
    with pytest.raises(ConfigError, match=rf"loss\.cbd_veto_table: built with tokenizer 0123abcd, but data\.tokenizer_dir .* has hash {ours}"):
        _check_tokenizers(cfg, pairs, 512, {"loss.cbd_veto_table": {"tokenizer_hash": "0123abcd"}})
    with pytest.raises(ConfigError, match=r"data\.bci_path: built over a vocabulary of 768 tokens, the model has 512"):
        _check_tokenizers(cfg, pairs, 512, {"data.bci_path": {"vocab_size": 768}})
