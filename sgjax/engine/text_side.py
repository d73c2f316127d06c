"""The text side of a checkpoint: its tokenizer, end-of-sequence ids and grammar compiler. Both the engine
core and a caller side in another process load it (the caller to tokenize and to reject a bad constraint
before it is sent)."""

from __future__ import annotations

from sgjax.constrained import GrammarCompiler
from sgjax.models.loader import load_tokenizer


def load_text_side(model_path: str, load_format: str,
                   vocab_size: int) -> tuple[object | None, set[int], GrammarCompiler | None]:
    """The checkpoint's tokenizer, its end-of-sequence ids and a GrammarCompiler over them. With dummy weights
    and no tokenizer files, requests are token ids only: the tokenizer and the grammar compiler are None."""
    try:
        tokenizer = load_tokenizer(model_path)
    except FileNotFoundError:
        if load_format != "dummy":
            raise
        tokenizer = None
    eos_token_ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_token_ids.add(tokenizer.eos_token_id)
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        eos_token_ids.update([eos] if isinstance(eos, int) else (eos or []))
    except OSError:
        pass
    grammar = GrammarCompiler(tokenizer, vocab_size, eos_token_ids) if tokenizer is not None else None
    return tokenizer, eos_token_ids, grammar
