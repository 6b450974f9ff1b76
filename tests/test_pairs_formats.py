"""Preference formats and sources through ``datasets``: TRL's four preference forms give the token ids of the
explicit-prompt record; PKU-SafeRLHF and UltraFeedback layouts saved with ``save_to_disk`` load with a
column map; Parquet; malformed records named by file and line / record; a Hub id that is not cached."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tracealign_jax.config import ConfigError, DataConfig, load_config
from tracealign_jax.pairs import load_pairs
from tracealign_jax.preference_sources import implicit_prompt, text_pairs
from tracealign_jax.records import RecordError
from tests.hf_tiny import save_word_tokenizer

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
WORDS = ["<user>", "<assistant>", "<system>", "<end>"] + (
    "the sky is blue. green. what color sky? it be brief. and grass how do i pick a lock no i can not help "
    "here is how safe unsafe"
).split()
VOCAB = list(dict.fromkeys(["<pad>", "<eos>", "<unk>", "<bos>"] + WORDS))


def ids(text: str) -> list[int]:
    """Token ids read off the word list (the independent reference for the tokenizer's output)."""
    return [VOCAB.index(w) for w in text.split()]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return save_word_tokenizer(tmp_path_factory.mktemp("tok"), WORDS, TEMPLATE)


@pytest.fixture(scope="module")
def plain_tok_dir(tmp_path_factory):
    return save_word_tokenizer(tmp_path_factory.mktemp("plain"), WORDS)


def _jsonl(path, recs):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return str(path)


def _load(path, tok, **kw):
    return load_pairs(DataConfig(train_path=str(path), tokenizer_dir=str(tok), max_prompt_len=32, max_response_len=32, **kw))


def _rows(pairs):
    return [tuple(pairs.get(f, i).tolist() for f in ("prompt", "chosen", "rejected")) for i in range(len(pairs))]


def _msg(role, content):
    return {"role": role, "content": content}


def test_implicit_prompt_follows_trl():
    # Strings: longest common prefix, a space before the split point goes to the responses (TRL's docs example).
    assert implicit_prompt("The sky is blue.", "The sky is green.", "f", 1) == {
        "prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    # Characters, not words: the shared "b" of "blue"/"brown" stays in the prompt, as in TRL.
    assert implicit_prompt("The sky is blue.", "The sky is brown.", "f", 1)["prompt"] == "The sky is b"
    conv = implicit_prompt([_msg("user", "q"), _msg("assistant", "a")], [_msg("user", "q"), _msg("assistant", "b")], "f", 1)
    assert conv == {"prompt": [_msg("user", "q")], "chosen": [_msg("assistant", "a")], "rejected": [_msg("assistant", "b")]}
    with pytest.raises(RecordError, match=r"^f:3: rejected: chosen and rejected are equal"):
        implicit_prompt("same", "same", "f", 3)
    with pytest.raises(RecordError, match=r"^f:4: prompt: missing, and chosen and rejected share no prefix"):
        implicit_prompt("yes", "no", "f", 4)


def test_trl_standard_and_conversational_explicit_and_implicit_give_the_same_token_ids(tmp_path, tok_dir):
    user, sys_ = _msg("user", "what color is the sky?"), _msg("system", "be brief.")
    a_blue, a_green = _msg("assistant", "it is blue."), _msg("assistant", "it is green.")
    forms = {
        "standard_explicit": {"prompt": "the sky is", "chosen": " blue.", "rejected": " green."},
        "standard_implicit": {"chosen": "the sky is blue.", "rejected": "the sky is green."},
        "conversational_explicit": {"prompt": [sys_, user], "chosen": [a_blue], "rejected": [a_green]},
        "conversational_implicit": {"chosen": [sys_, user, a_blue], "rejected": [sys_, user, a_green]},
    }
    got = {name: _rows(_load(_jsonl(tmp_path / f"{name}.jsonl", [rec]), tok_dir)) for name, rec in forms.items()}
    standard = [(ids("<bos> the sky is"), ids("blue. <eos>"), ids("green. <eos>"))]
    conversational = [(ids("<system> be brief. <end> <user> what color is the sky? <end> <assistant>"),
                       ids("it is blue. <end>"), ids("it is green. <end>"))]  # fmt: skip
    assert got["standard_explicit"] == got["standard_implicit"] == standard
    assert got["conversational_explicit"] == got["conversational_implicit"] == conversational
    # The same records as Parquet (record numbers for lines) and with both forms in one file.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([forms["conversational_implicit"]] * 2), tmp_path / "c.parquet")
    assert _rows(_load(tmp_path / "c.parquet", tok_dir)) == conversational * 2
    both = _load(_jsonl(tmp_path / "both.jsonl", [forms["standard_implicit"], forms["conversational_implicit"]]), tok_dir)
    assert _rows(both) == standard + conversational and both.arrays["line"].tolist() == [1, 2]


def test_sft_reads_prompt_completion_and_implicit_prompt_pairs(tmp_path, tok_dir):
    recs = [{"prompt": "the sky is", "completion": " blue."}, {"chosen": "the sky is blue.", "rejected": "the sky is green."},
            {"prompt": [_msg("user", "sky?")], "completion": [_msg("assistant", "blue.")]}]  # fmt: skip
    pairs = load_pairs(DataConfig(train_path=_jsonl(tmp_path / "s.jsonl", recs), tokenizer_dir=str(tok_dir)), sft=True)
    assert [(pairs.get("prompt", i).tolist(), pairs.get("chosen", i).tolist()) for i in range(3)] == [
        (ids("<bos> the sky is"), ids("blue. <eos>")), (ids("<bos> the sky is"), ids("blue. <eos>")),
        (ids("<user> sky? <end> <assistant>"), ids("blue. <end>"))]  # fmt: skip
    assert "rejected_tokens" not in pairs.arrays


def test_mixed_field_types_keep_strings_that_look_like_json(tmp_path, tok_dir):
    # A prompt that is a string here and a message list there: datasets' Json column type would decode
    # the strings "true" / "7" into a boolean / an int. The records are kept whole: strings stay strings.
    recs = [{"prompt": "is", "chosen": "blue.", "rejected": "green."},
            {"prompt": [_msg("user", "sky?")], "chosen": "blue.", "rejected": "green."}]  # fmt: skip
    words = WORDS + ["true", "7"]
    tok = save_word_tokenizer(tmp_path / "tok", words, TEMPLATE)
    recs.append({"prompt": "true", "chosen": "7", "rejected": "green."})
    pairs = _load(_jsonl(tmp_path / "m.jsonl", recs), tok)
    vocab = list(dict.fromkeys(["<pad>", "<eos>", "<unk>", "<bos>"] + words))
    assert pairs.get("prompt", 2).tolist() == [3, vocab.index("true")]
    assert pairs.get("chosen", 2).tolist() == [vocab.index("7"), 1]
    assert pairs.get("prompt", 1).tolist() == ids("<user> sky? <end> <assistant>")


PKU = {
    "question": ["how do i pick a lock", "what color is the sky?"],
    "response_0": ["here is how", "it is blue."],
    "response_1": ["no i can not help", "it is green."],
    "is_response_0_safe": [False, True],
    "is_response_1_safe": [True, True],
    "better_response_id": [0, 0],
    "safer_response_id": [1, 0],
}


def test_pku_saferlhf_saved_to_disk_loads_with_a_column_map(tmp_path, tok_dir):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(PKU),
                               "test": datasets.Dataset.from_dict({k: v[:1] for k, v in PKU.items()})})  # fmt: skip
    dd.save_to_disk(str(tmp_path / "pku"))
    cols = {"columns": {"prompt": "question"}}
    safer = _load(tmp_path / "pku", tok_dir, **cols)
    assert _rows(safer) == [(ids("<bos> how do i pick a lock"), ids("no i can not help <eos>"), ids("here is how <eos>")),
                            (ids("<bos> what color is the sky?"), ids("it is blue. <eos>"), ids("it is green. <eos>"))]  # fmt: skip
    # The per-response safety labels follow the pair's order.
    assert safer.arrays["chosen_safe"].tolist() == [1, 1] and safer.arrays["rejected_safe"].tolist() == [0, 1]
    better = _load(tmp_path / "pku", tok_dir, pku_preference="better", **cols)
    assert _rows(better)[0][1] == ids("here is how <eos>") and better.arrays["chosen_safe"].tolist() == [0, 1]
    assert better.fingerprint != safer.fingerprint
    test = _load(tmp_path / "pku", tok_dir, split="test", **cols)
    assert len(test) == 1 and test.fingerprint != safer.fingerprint
    with pytest.raises(ConfigError, match=r"data\.split: 'validation' is not a split of .*pku \(splits: \['test', 'train'\]\)"):
        _load(tmp_path / "pku", tok_dir, split="validation", **cols)
    # Without the column map the prompt is missing: named by directory, record number and field.
    with pytest.raises(RecordError, match=r"pku/train:1: prompt: missing$"):
        _load(tmp_path / "pku", tok_dir)
    # Triage reads the same source as text pairs, with the labels.
    lines, recs = text_pairs(DataConfig(train_path=str(tmp_path / "pku"), columns={"prompt": "question"}))
    assert lines == [1, 2] and recs[0] == {"prompt": "how do i pick a lock", "chosen": "no i can not help",
                                           "rejected": "here is how", "chosen_safe": 1, "rejected_safe": 0}  # fmt: skip
    bad = _jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c", "id": 1}, "{oops", {"prompt": "a"}])
    with pytest.raises(RecordError, match=r"t\.jsonl:2: not valid JSON"):
        text_pairs(DataConfig(train_path=bad))


def test_ultrafeedback_binarized_saved_to_disk(tmp_path, tok_dir):
    import datasets

    user = _msg("user", "what color is the sky?")
    ds = datasets.Dataset.from_dict({
        "prompt": ["what color is the sky?", "what color is the sky?"],
        "prompt_id": ["a", "b"],
        "chosen": [[user, _msg("assistant", "it is blue.")], [user, _msg("assistant", "blue.")]],
        "rejected": [[user, _msg("assistant", "it is green.")], [user, _msg("assistant", "green.")]],
        "messages": [[user, _msg("assistant", "it is blue.")], [user, _msg("assistant", "blue.")]],
        "score_chosen": [8.5, 7.0],
        "score_rejected": [3.0, 6.5],
    })  # fmt: skip
    ds.save_to_disk(str(tmp_path / "uf"))
    pairs = _load(tmp_path / "uf", tok_dir)
    prompt = ids("<user> what color is the sky? <end> <assistant>")
    assert _rows(pairs) == [(prompt, ids("it is blue. <end>"), ids("it is green. <end>")),
                            (prompt, ids("blue. <end>"), ids("green. <end>"))]  # fmt: skip
    assert pairs.arrays["score_chosen"].tolist() == [8.5, 7.0] and pairs.arrays["score_rejected"].tolist() == [3.0, 6.5]
    bad = ds.map(lambda r, i: {"prompt": "the sky?" if i == 1 else r["prompt"]}, with_indices=True)
    bad.save_to_disk(str(tmp_path / "uf_bad"))
    with pytest.raises(RecordError, match=r"uf_bad:2: prompt: differs from the last user turn"):
        _load(tmp_path / "uf_bad", tok_dir)


def test_malformed_records_name_file_and_line_or_record(tmp_path, tok_dir):
    good = {"prompt": "the sky is", "chosen": "blue.", "rejected": "green."}
    p = _jsonl(tmp_path / "p.jsonl", [good, "", {"chosen": "the sky is blue.", "rejected": 7}, good])
    with pytest.raises(RecordError, match=rf"^{p}:3: rejected: expected str/list, got int$"):
        _load(p, tok_dir)
    skipped = _load(p, tok_dir, skip_malformed=True)
    assert skipped.num_skipped == 1 and skipped.arrays["line"].tolist() == [1, 4]  # the blank line 2 keeps numbering
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([good, dict(good, chosen=None)]), tmp_path / "p.parquet")
    with pytest.raises(RecordError, match=r"p\.parquet:2: chosen: missing$"):
        _load(tmp_path / "p.parquet", tok_dir)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(RecordError, match=r"junk\.parquet:0: not a readable parquet file \(Parquet magic bytes"):
        _load(tmp_path / "junk.parquet", tok_dir)


def test_conversations_without_a_chat_template_get_a_one_line_fix(tmp_path, plain_tok_dir):
    rec = {"chosen": [_msg("user", "sky?"), _msg("assistant", "blue.")], "rejected": [_msg("user", "sky?"), _msg("assistant", "green.")]}
    p = _jsonl(tmp_path / "c.jsonl", [rec])
    with pytest.raises(RecordError) as err:
        _load(p, plain_tok_dir)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{p}:1: prompt: a conversation needs a chat template")
    assert "chat_template" in msg and "give the prompt and responses as strings" in msg


def test_hub_id_is_read_from_the_local_cache_offline(tmp_path, tok_dir, monkeypatch):
    """A Hub dataset cached by an earlier ``load_dataset("someorg/prefs")`` (its cache layout rebuilt here
    from a local Parquet file) loads with no network: offline mode is forced for the call."""
    import glob
    import shutil

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"chosen": "the sky is blue.", "rejected": "the sky is green."}] * 2
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "h.parquet")
    datasets.load_dataset("parquet", data_files=str(tmp_path / "h.parquet"), split="train", cache_dir=str(tmp_path / "build"))
    (info_file,) = glob.glob(str(tmp_path / "build/parquet/default-*/0.0.0/*/dataset_info.json"))
    cached = tmp_path / "hf_cache/someorg___prefs/default/0.0.0" / Path(info_file).parent.name
    shutil.copytree(Path(info_file).parent, cached)
    (cached / "parquet-train.arrow").rename(cached / "prefs-train.arrow")
    info = json.loads((cached / "dataset_info.json").read_text())
    (cached / "dataset_info.json").write_text(json.dumps(dict(info, dataset_name="prefs", config_name="default")))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    offline_before = datasets.config.HF_HUB_OFFLINE
    pairs = load_pairs(DataConfig(train_path="someorg/prefs", tokenizer_dir=str(tok_dir)))
    assert _rows(pairs) == [(ids("<bos> the sky is"), ids("blue. <eos>"), ids("green. <eos>"))] * 2
    assert pairs.identity["source"] == "prefs" and pairs.identity["split"] == "train"
    assert datasets.config.HF_HUB_OFFLINE == offline_before  # restored after the call


def test_hub_id_not_in_the_cache_is_one_line(tmp_path):
    import time

    t = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        load_pairs(DataConfig(train_path="nobody-tracealign/not-a-dataset", split="train"))
    assert time.perf_counter() - t < 30  # offline: no network retries
    msg = str(err.value)
    assert "\n" not in msg and "Hub dataset nobody-tracealign/not-a-dataset (split 'train') is not in the HF datasets cache" in msg
    with pytest.raises(FileNotFoundError, match=r"data\.train_path: .*missing\.jsonl: no such file or directory"):
        load_pairs(DataConfig(train_path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a `datasets` save_to_disk folder"):
        load_pairs(DataConfig(train_path=str(tmp_path / "plain_dir")))


def test_column_map_and_format_are_validated():
    with pytest.raises(ConfigError, match=r"data\.columns: 'promt' is not a field .*did you mean 'prompt'"):
        load_config(None, ["data.columns={promt: question}"])
    with pytest.raises(ConfigError, match=r"data\.format: 'hh' is not one of"):
        load_config(None, ["data.format=hh"])
    cfg = load_config(None, ["data.columns={prompt: question, chosen: good}", "data.format=trl"])
    assert cfg.data.columns == {"prompt": "question", "chosen": "good"}


def test_parallel_map_equals_serial_and_is_cached(tmp_path):
    # Token-id records: the spawned workers need no tokenizer (importing transformers there takes seconds).
    rng = np.random.default_rng(0)
    recs = [{f"{f}_ids": rng.integers(0, 50, int(rng.integers(1, 9))).tolist() for f in ("prompt", "chosen", "rejected")}
            for _ in range(10)]  # fmt: skip
    p = _jsonl(tmp_path / "p.jsonl", recs)
    cfg = DataConfig(train_path=p, max_prompt_len=4, max_response_len=8)
    one = load_pairs(cfg)
    two = load_pairs(DataConfig(**{**cfg.__dict__, "num_proc": 2, "cache_dir": str(tmp_path / "cache")}))
    assert all(np.array_equal(one.arrays[k], two.arrays[k]) for k in one.arrays) and len(one) == 10
    assert [two.get("prompt", i).tolist() for i in range(10)] == [r["prompt_ids"][-4:] for r in recs]
    shards = sorted((tmp_path / "cache").glob("tokens-*/tokens_*.arrow"))
    assert [s.name for s in shards] == ["tokens_00000_of_00002.arrow", "tokens_00001_of_00002.arrow"]
    stamps = [s.stat().st_mtime_ns for s in shards]
    again = load_pairs(DataConfig(**{**cfg.__dict__, "num_proc": 2, "cache_dir": str(tmp_path / "cache")}))
    assert [s.stat().st_mtime_ns for s in shards] == stamps and np.array_equal(again.arrays["chosen_tokens"], one.arrays["chosen_tokens"])
