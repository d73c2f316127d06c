"""IncrementalDetokenizer against the tokenizer's own decode of the whole output (the oracle), on both of
its paths: the Rust stream (fast tokenizers) and the window of Python decodes (any other)."""

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgjax.engine import detokenizer
from sgjax.engine.detokenizer import IncrementalDetokenizer, stream_backend
from sgjax.testing.tiny_models import make_tokenizer


@pytest.fixture(scope="module")
def bpe():
    return make_tokenizer(400)


@pytest.fixture(scope="module")
def wordpiece():
    """A WordPiece tokenizer whose decode cleans up spaces before punctuation, as transformers does for BERT."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]"])
    tok.train_from_iterator(["Hello there, world. Don't stop! Is it ok? A café, naïve."] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   clean_up_tokenization_spaces=True)


@pytest.fixture(scope="module")
def byte_fallback():
    """A Llama-2 / Mistral style tokenizer: "▁" for spaces, bytes for what the vocabulary lacks, the leading space
    stripped when decoding."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(["Hello there, world. Don't stop! héllo wörld naïve café"] * 20,
                            trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@contextlib.contextmanager
def windows_only():
    """IncrementalDetokenizer as without tokenizers' stream: the window of Python decodes."""
    saved, detokenizer.DecodeStream = detokenizer.DecodeStream, None
    try:
        yield
    finally:
        detokenizer.DecodeStream = saved


def run(tokenizer, ids, skip=True) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    return [detok.add(i) for i in ids] + [detok.flush()], detok


@pytest.mark.parametrize("stream", [True, False])
def test_text_splits_no_character(bpe, stream):
    text = "héllo wörld, 你好 🙂 naïve café"
    ids = bpe.encode(text)
    assert len(ids) > len(text) // 2  # byte-level pieces: multi-byte characters span several tokens
    with contextlib.nullcontext() if stream else windows_only():
        deltas, detok = run(bpe, ids)
    assert (detok._stream is not None) == stream
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == text


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 399), max_size=40), skip=st.booleans(), stream=st.booleans())
def test_any_ids_decode_as_the_whole(bpe, ids, skip, stream):
    """Random ids (special tokens, bytes that never complete a character) come out as decode(ids) does."""
    with contextlib.nullcontext() if stream else windows_only():
        deltas, detok = run(bpe, ids, skip)
    assert "".join(deltas) == detok.text == bpe.decode(ids, skip_special_tokens=skip)
    # a character is held back until it completes, or the request ends
    assert all(not d.endswith("\ufffd") for d in deltas[:-1])


def test_a_tokenizer_that_cleans_up_spaces_takes_its_own_decode(wordpiece):
    ids = wordpiece.encode("Hello there , world . Don 't stop !", add_special_tokens=False)
    backend = wordpiece.backend_tokenizer.decode(ids)
    assert wordpiece.decode(ids) != backend  # the clean-up changes this text
    assert stream_backend(wordpiece) is None
    deltas, detok = run(wordpiece, ids)
    assert detok._stream is None
    # each window is cleaned up on its own: equal to the whole decode up to rules that span two windows
    assert "".join(deltas).replace(" ' ", "'") == wordpiece.decode(ids)


def test_the_stream_serves_fast_tokenizers_without_clean_up(bpe):
    assert stream_backend(bpe) is bpe.backend_tokenizer
    assert stream_backend(object()) is None  # no Rust backend


def test_byte_fallback_text_streams_exactly(byte_fallback):
    text = "Hello there, 你好 🙂 naïve café"  # the CJK and the emoji are not in the vocabulary: bytes
    ids = byte_fallback.encode(text, add_special_tokens=False)
    # the trainer registers the byte tokens as special ones (in Llama 2's vocabulary they are not): keep them
    deltas, detok = run(byte_fallback, ids, skip=False)
    assert detok._stream is not None
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == byte_fallback.decode(ids) == text


@settings(max_examples=80, deadline=None)
@given(ids=st.lists(st.integers(0, 599), max_size=30), skip=st.booleans())
def test_byte_fallback_any_ids_stream_as_the_windows_do(byte_fallback, ids, skip):
    """Random bytes that never form a character decode differently piece by piece than whole, by either method;
    tokenizers' stream even rejects some such sequences. The request then goes on by windows, never fails, and
    its text is the window method's."""
    streamed, _ = run(byte_fallback, ids, skip)
    with windows_only():
        windows, _ = run(byte_fallback, ids, skip)
    assert "".join(streamed) == "".join(windows)


def test_a_sequence_the_stream_rejects_goes_on_by_windows(byte_fallback):
    ids = byte_fallback.convert_tokens_to_ids(["<0x46>", "<0xF7>", "ther"])  # "F", a lone byte 0xF7, "ther"
    assert byte_fallback.unk_token_id not in ids
    deltas, detok = run(byte_fallback, ids, skip=False)
    assert detok._stream is None  # tokenizers' stream raised at "ther"
    with windows_only():
        windows, _ = run(byte_fallback, ids, skip=False)
    assert deltas == windows


class SpacedSpecials:
    """A slow-style tokenizer (no Rust backend) whose decode spaces special tokens unless told not to, as
    transformers' Python tokenizers do."""

    special = {0: "<s>", 1: "</s>"}
    bos_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens=False, spaces_between_special_tokens=True):
        pieces = [("" if skip_special_tokens else self.special[i]) if i in self.special else "ab"[i % 2]
                  for i in ids]
        return (" " if spaces_between_special_tokens else "").join(p for p in pieces if p)


@pytest.mark.parametrize("spaces", [True, False])
def test_spaces_between_special_tokens_reach_the_tokenizers_decode(spaces):
    ids = [0, 2, 3, 1, 2]
    detok = IncrementalDetokenizer(SpacedSpecials(), skip_special_tokens=False, spaces_between_special_tokens=spaces)
    for token in ids:
        detok.add(token)
    detok.flush()
    assert detok.text == SpacedSpecials().decode(ids, spaces_between_special_tokens=spaces)
    assert (" " in detok.text) == spaces
