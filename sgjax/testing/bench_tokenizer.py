"""A tokenizer with a real model's vocabulary size, trained offline, for benchmarks that need text.

Benchmarks run on dummy weights with no model hub, but constrained decoding needs a tokenizer, and
the cost of its token masks grows with the vocabulary. This trains a byte-level BPE (Llama 3's kind of
tokenizer) on the Python standard library's source and docs, which the machine always has, up to the
requested size. Its tokens are code and English fragments, like a real 128k vocabulary's.
"""

from __future__ import annotations

import glob
import os
import sysconfig

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


def _corpus(max_bytes: int):
    stdlib = sysconfig.get_paths()["stdlib"]
    total = 0
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        yield text
        total += len(text)
        if total >= max_bytes:
            return


def train_bench_tokenizer(folder: str, vocab_size: int = 128256, max_bytes: int = 40_000_000):
    """Train and save (tokenizer.json etc.) into `folder`; returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(max_bytes), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1])
    fast.save_pretrained(folder)
    return fast
