"""The tokenizer a GGUF file describes, built with the `tokenizers` library from the file's metadata.

transformers can build it too (`AutoTokenizer.from_pretrained(folder, gguf_file=name)`), but that path imports
torch and parses the file with gguf's slow reader: seconds for a 49k-token vocabulary, and torch installed only
for this. Here the metadata comes from sgjax's reader (shared with the model's config and weights) and the
tokenizer is assembled directly, the same as transformers assembles it, so the two encode and decode alike.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: SmolLM, Qwen2/3, Llama 3) with a known
`tokenizer.ggml.pre` are built here; anything else raises UnsupportedGGUFTokenizer, and the caller may hand the
file to transformers instead.
"""

from __future__ import annotations

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from sgjax.models.gguf import open_gguf

# llama.cpp's token types (gguf.TokenType)
CONTROL = 3
USER_DEFINED = 4

# The split that runs before byte-level BPE, by `tokenizer.ggml.pre`: the regex the vocabulary's merges were
# learned with. None: GPT-2's own split (ByteLevel with use_regex), which is also what transformers uses for a
# value it does not know; "smollm" is one of those (llama.cpp splits its digits singly, but SmolLM's merges join
# no digits, so the tokens come out the same). A value missing here is unsupported rather than guessed at: a new
# one may need its own regex.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    "gpt-2": None,
    "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class UnsupportedGGUFTokenizer(ValueError):
    """The file's tokenizer is of a kind this module does not build (transformers may)."""


def tokenizer_from_gguf(path: str) -> transformers.PreTrainedTokenizerFast:
    """The tokenizer of GGUF file `path`, with its special tokens and chat template; UnsupportedGGUFTokenizer
    (naming what is unsupported) for a vocabulary other than byte-level BPE with a known pre-tokenizer."""
    f = open_gguf(path)
    model = f.get("tokenizer.ggml.model", None)
    if model != "gpt2":
        raise UnsupportedGGUFTokenizer(f"GGUF file {path!r} has tokenizer model {model!r}; sgjax builds only "
                                       f"'gpt2' (byte-level BPE)")
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise UnsupportedGGUFTokenizer(f"GGUF file {path!r} has pre-tokenizer {pre!r}; sgjax knows the splits of "
                                       f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}")
    tokens: list[str] = f.get("tokenizer.ggml.tokens")
    types: list[int] = f.get("tokenizer.ggml.token_type", None) or []
    merges: list[str] = f.get("tokenizer.ggml.merges")

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    # A byte-level vocabulary spells every byte as one of 256 printable characters; llama.cpp's converter writes
    # a few tokens (added ones, mostly) in plain text, so those are respelled to the byte alphabet for BPE.
    respell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {
        token if set(token) <= alphabet else "".join(piece for piece, _ in respell.pre_tokenize_str(token)): index
        for index, token in enumerate(tokens)
    }
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], dropout=None,
                              continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS[pre]
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_end|>) are special and user-defined ones (<think>) plain added tokens, both matched
    # whole in text, as llama.cpp matches them. A control token spelled outside the byte alphabet is a converter
    # mislabel (transformers skips it too); so is a user-defined token that is not in the vocabulary as written.
    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, types) if kind == CONTROL and set(t) <= alphabet]
    user_defined = [AddedToken(t, normalized=False, special=False)
                    for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab]
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user_defined)

    def token_of(key: str) -> str | None:
        index = f.get(f"tokenizer.ggml.{key}", None)
        return tokens[index] if index is not None else None

    special = {"bos_token": token_of("bos_token_id"), "eos_token": token_of("eos_token_id"),
               "unk_token": token_of("unknown_token_id"), "pad_token": token_of("padding_token_id")}
    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(f.get("tokenizer.ggml.add_eos_token", False))
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, **special, add_bos_token=add_bos, add_eos_token=add_eos,
        chat_template=f.get("tokenizer.chat_template", None))
    # transformers 5 builds this from add_bos_token/add_eos_token (the same template); 4.x ignores those flags.
    wrapped.backend_tokenizer.post_processor = _bos_eos_template(
        (wrapped.bos_token, wrapped.bos_token_id) if add_bos and wrapped.bos_token is not None else None,
        (wrapped.eos_token, wrapped.eos_token_id) if add_eos and wrapped.eos_token is not None else None)
    return wrapped


def _bos_eos_template(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.TemplateProcessing:
    """A post-processor putting `bos` (token, id) before and `eos` after each sequence; None: not added."""
    def wrap(seq: str, type_id: int) -> str:
        parts = ([bos[0]] if bos else []) + [f"${seq}"] + ([eos[0]] if eos else [])
        return " ".join(f"{part}:{type_id}" for part in parts)

    return processors.TemplateProcessing(single=wrap("A", 0), pair=f"{wrap('A', 0)} {wrap('B', 1)}",
                                         special_tokens=[t for t in (bos, eos) if t])
