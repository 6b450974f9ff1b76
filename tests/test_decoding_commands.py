"""`tracealign decode` end to end: HF dir + tokenizer + veto table dir -> completions JSONL."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tracealign_jax import cli

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "mix the flour and water", "bake the bread slowly"] * 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tracealign_jax.evaluation.bpe import train_bpe_tokenizer
    from tracealign_jax.veto.store import compile_veto_table, save_veto_table

    root = tmp_path_factory.mktemp("decode_cli")
    tok_dir = train_bpe_tokenizer(TEXTS, root / "tok", vocab_size=300, min_frequency=1)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ))  # fmt: skip
    hf.save_pretrained(root / "policy")
    tok.save_pretrained(str(root / "policy"))
    # Veto every continuation of "the cat" by any token (EOS included): the row can only refuse.
    cat = tok.encode("the cat", add_special_tokens=False)
    spans = [(cat + [t], 40.0) for t in range(len(tok))]
    save_veto_table(compile_veto_table(spans, max_span=len(cat) + 1, max_entries=len(tok)), root / "veto")
    with open(root / "prompts.jsonl", "w") as f:
        f.write(json.dumps({"id": "a", "prompt": "the cat"}) + "\n")
        f.write(json.dumps({"prompt_ids": [1] + tok.encode("mix the", add_special_tokens=False)}) + "\n")
    return root, tok, cat


def test_decode_cli_with_hard_veto_refuses(setup, capsys):
    root, tok, cat = setup
    out = root / "out.jsonl"
    rc = cli.main([
        "decode", "--checkpoint", str(root / "policy"), "--prompts", str(root / "prompts.jsonl"),
        "--out", str(out), "--veto-table", str(root / "veto"), "--veto", "hard", "--no-progress",
        "--set", "decode.method=greedy", "--set", "decode.max_new_tokens=5", "--set", "decode.tau=1.0",
        "--set", "decode.min_prefix=2", "--set", "decode.prompt_buckets=[8]", "--set", "decode.refusal=sorry",
    ])  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["prompts"] == 2 and summary["compiles"] == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["id"] == "a" and rows[1]["id"] == 2
    # "the cat" + any token is vetoed: the first row must refuse at once, having vetoed all V tokens.
    first = rows[0]
    refusal = tok.encode("sorry", add_special_tokens=False)
    assert first["refused"] and first["token_ids"][: len(refusal)] == refusal
    assert first["veto_count"] == len(tok)
    assert first["vetoed_spans"][0]["context_ids"][-2:] == cat
    assert first["completion"].startswith("sorry")
    assert not rows[1]["refused"] and rows[1]["veto_count"] == 0 and rows[1]["vetoed_spans"] == []
    assert isinstance(rows[1]["completion"], str) and np.isfinite(rows[1]["score"])


def test_decode_cli_bad_record_names_line(setup, capsys):
    root, _, _ = setup
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"prompt_ids": [1, 2]}) + "\n" + json.dumps({"prompt_ids": "x"}) + "\n")
    rc = cli.main(["decode", "--checkpoint", str(root / "policy"), "--prompts", str(bad), "--out",
                   str(root / "o.jsonl"), "--no-progress", "--set", "decode.max_new_tokens=2"])  # fmt: skip
    assert rc == 2
    assert f"{bad}:2: prompt_ids" in capsys.readouterr().err


def test_decode_cli_chat_prompt_without_a_chat_template_is_one_line(setup, capsys):
    root, tok, _ = setup
    assert tok.chat_template is None
    chat = root / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": "the cat"}) + "\n" + json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    rc = cli.main(["decode", "--checkpoint", str(root / "policy"), "--prompts", str(chat), "--out", str(root / "c.jsonl"),
                   "--no-progress", "--set", "decode.max_new_tokens=2"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"tracealign decode: error: {chat}:2: prompt: a conversation needs a tokenizer with a chat template")
