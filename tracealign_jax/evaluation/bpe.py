"""Train a byte-level BPE tokenizer on a text corpus and save it as a Hugging Face tokenizer directory.

The directory (``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``) loads with
``transformers.AutoTokenizer.from_pretrained`` and is what the index build, the data pipeline,
decoding and the HF export all share. Special tokens: ``<pad>`` = 0 (the pad id every batch uses),
``<s>`` = 1 (BOS, prepended to every encoded text), ``</s>`` = 2 (EOS, appended to responses by the
data pipeline). Byte-level pre-tokenization splits before spaces, so encoding a prompt and its
response separately gives the same ids as encoding their concatenation: the index, the training data
and the decoder all see one token sequence for one text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024,
                        min_frequency: int = 2) -> Path:
    """Trains the tokenizer on ``texts`` and writes the HF directory ``out_dir``; returns it.

    Deterministic for a given corpus and settings (the BPE trainer breaks ties by byte order).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", clean_up_tokenization_spaces=False)
    out_dir = Path(out_dir)
    fast.save_pretrained(str(out_dir))
    return out_dir
