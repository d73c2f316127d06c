"""The tokenizer sgjax builds from a GGUF file's metadata (sgjax/models/gguf_tokenizer.py) against transformers'
own GGUF tokenizer of the same file: the bundled SmolLM2, and small files written here for the pre-tokenizers,
BOS handling and token types SmolLM2 does not have. Files sgjax does not build go to transformers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers
from gguf import GGUFWriter

from sgjax.models.default_model import default_model_path
from sgjax.models.gguf import GGUFFile
from sgjax.models.gguf_tokenizer import PRE_TOKENIZER_SPLITS, UnsupportedGGUFTokenizer, tokenizer_from_gguf
from sgjax.models.loader import load_tokenizer
from tests.gguf_files import fast_transformers_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé, Ångström, Straße; 東京は日本の首都です。 你好，世界 🙂👍🏽 🇫🇷 مرحبا بالعالم",
    "a  b   c\t\td\n\ne\r\n  \n\t x   ",
    "1234567 and 3.14159, 2024-01-31, 1,000,000",
    "def f(x):\n    if x:\n        return {'a': [1, 2]}  # comment\n\treturn None\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|im_end|><think>x</think>",
    " leading space",
    "   ",
    "I'm sure they'll say it's DON'T's $100 @user #tag",
    "",
]


def oracle(path: str):
    """transformers' tokenizer of a GGUF file."""
    folder, name = os.path.split(path)
    with fast_transformers_gguf():
        return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def backend(tokenizer) -> dict:
    """The whole `tokenizers` pipeline (model, added tokens, normalizer, pre-tokenizer, post-processor, decoder)."""
    return json.loads(tokenizer.backend_tokenizer.to_str())


def assert_same_tokenizer(ours, theirs):
    assert backend(ours) == backend(theirs)
    assert len(ours) == len(theirs) and ours.get_vocab() == theirs.get_vocab()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "all_special_ids"):
        assert getattr(ours, name) == getattr(theirs, name), name
    for special in (True, False):
        for text in TEXTS:
            assert ours.encode(text, add_special_tokens=special) == theirs.encode(text, add_special_tokens=special)
            ids = theirs.encode(text, add_special_tokens=special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


# The bundled SmolLM2-135M-Instruct ("gpt2" vocabulary, "smollm" pre-tokenizer, 17 control tokens).

@pytest.fixture(scope="module")
def smollm2():
    """(ours through the engine's loader, transformers') for the bundled model file."""
    path = default_model_path()
    return load_tokenizer(path), oracle(path)


def test_smollm2_pipeline_and_special_tokens_match(smollm2):
    ours, theirs = smollm2
    assert backend(ours) == backend(theirs)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == \
        (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id)
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == \
        (theirs.bos_token, theirs.eos_token, theirs.pad_token, theirs.unk_token)
    assert len(ours) == len(theirs) and ours.get_vocab() == theirs.get_vocab()
    assert ours.all_special_ids == theirs.all_special_ids
    assert ours.chat_template == theirs.chat_template


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_smollm2_encode_matches(smollm2, add_special_tokens):
    ours, theirs = smollm2
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=add_special_tokens) == \
            theirs.encode(text, add_special_tokens=add_special_tokens), text
    im_start = theirs.convert_tokens_to_ids("<|im_start|>")
    assert ours.encode("<|im_start|>user")[0] == im_start  # a control token in text stays whole


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_smollm2_decode_matches(smollm2, skip_special_tokens):
    ours, theirs = smollm2
    rng = np.random.default_rng(0)
    sequences = [theirs.encode(text) for text in TEXTS]
    # Random ids too: control tokens, byte tokens that are not whole UTF-8 characters, anything.
    sequences += [rng.integers(0, len(theirs), 40).tolist() for _ in range(20)] + [list(range(40))]
    for ids in sequences:
        assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == \
            theirs.decode(ids, skip_special_tokens=skip_special_tokens), ids


def test_smollm2_ids_to_tokens_match(smollm2):
    ours, theirs = smollm2
    sample = list(range(300)) + list(range(300, len(theirs), 97)) + [len(theirs) - 1]
    assert ours.convert_ids_to_tokens(sample) == theirs.convert_ids_to_tokens(sample)


@pytest.mark.parametrize("tokenize", [False, True])
def test_smollm2_chat_template_matches(smollm2, tokenize):
    ours, theirs = smollm2
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Japan? 日本"}]
    got, expected = (t.apply_chat_template(messages, tokenize=tokenize, add_generation_prompt=True)
                     for t in (ours, theirs))
    assert got == expected
    assert (got["input_ids"] if tokenize else got)  # not an empty rendering that any tokenizer matches


def test_loading_the_bundled_tokenizer_imports_no_torch():
    """The engine's tokenizer path for a GGUF file, in a fresh interpreter: no torch, and its time printed."""
    code = (
        "import sys, time\n"
        "from sgjax.models.default_model import default_model_path\n"
        "from sgjax.models.loader import load_tokenizer\n"
        "start = time.perf_counter()\n"
        "tokenizer = load_tokenizer(default_model_path())\n"
        "print(f'load_tokenizer: {time.perf_counter() - start:.2f} s')\n"
        "assert tokenizer.encode('Hello') and tokenizer.chat_template\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         check=False)
    print(out.stdout, out.stderr[-2000:])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "load_tokenizer:" in out.stdout


def test_pre_tokenizer_splits_are_transformers():
    """Each pre-tokenizer sgjax knows splits as transformers splits it (None: transformers' GPT-2 default)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    for pre, split in PRE_TOKENIZER_SPLITS.items():
        assert split == GGUF_PRE_TOKENIZER_SPLITS.get(pre), pre


# Small files: a byte-level vocabulary cut from SmolLM2's, with what SmolLM2's file lacks.

def write_tokenizer_gguf(path: str, model: str, tokens: list[str], types: list[int], *, merges=None, scores=None,
                         pre=None, bos=None, eos=None, add_bos=None, chat_template=None) -> str:
    """A GGUF file with tokenizer metadata and a minimal llama config (transformers reads the config too)."""
    w = GGUFWriter(path, "llama")
    w.add_block_count(1), w.add_context_length(64), w.add_embedding_length(8), w.add_feed_forward_length(16)
    w.add_head_count(2), w.add_head_count_kv(1), w.add_layer_norm_rms_eps(1e-5), w.add_rope_dimension_count(4)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for value, add in ((pre, w.add_tokenizer_pre), (merges, w.add_token_merges), (scores, w.add_token_scores),
                       (bos, w.add_bos_token_id), (eos, w.add_eos_token_id), (add_bos, w.add_add_bos_token),
                       (chat_template, w.add_chat_template)):
        if value is not None:
            add(value)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.fixture(scope="module")
def byte_level_vocab():
    """(tokens, types, merges, chat template): SmolLM2's first 3000 tokens and the merges among them, plus a
    BOS control token, user-defined tokens, and tokens llama.cpp mislabels (spelled outside the byte alphabet)."""
    f = GGUFFile(default_model_path())
    tokens = f.get("tokenizer.ggml.tokens")[:3000]
    kept = set(tokens)
    merges = [m for m in f.get("tokenizer.ggml.merges") if set(m.split(" ")) <= kept and m.replace(" ", "") in kept]
    types = f.get("tokenizer.ggml.token_type")[:3000]
    extra = [("<|begin_of_text|>", 3), ("<think>", 4), ("</think>", 4), ("<|bad control|>", 3), ("a b", 4),
             ("ü", 1)]
    return (tokens + [t for t, _ in extra], types + [k for _, k in extra], merges,
            f.get("tokenizer.chat_template"))


@pytest.mark.parametrize("pre, add_bos", [("llama-bpe", True), ("qwen2", False), ("smollm", True)])
def test_byte_level_file_matches_transformers(tmp_path, byte_level_vocab, pre, add_bos):
    tokens, types, merges, template = byte_level_vocab
    path = write_tokenizer_gguf(str(tmp_path / "t.gguf"), "gpt2", tokens, types, merges=merges, pre=pre,
                                bos=tokens.index("<|begin_of_text|>"), eos=2, add_bos=add_bos,
                                chat_template=template)
    ours, theirs = tokenizer_from_gguf(path), oracle(path)
    assert_same_tokenizer(ours, theirs)
    with_bos = ours.encode("hi there")
    assert (with_bos[0] == ours.bos_token_id) == add_bos
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)


def test_unknown_pre_tokenizer_goes_to_transformers(tmp_path, byte_level_vocab):
    """A pre-tokenizer sgjax has no split for is not guessed: transformers builds the tokenizer."""
    tokens, types, merges, _ = byte_level_vocab
    path = write_tokenizer_gguf(str(tmp_path / "t.gguf"), "gpt2", tokens, types, merges=merges,
                                pre="some-future-pre", eos=2)
    with pytest.raises(UnsupportedGGUFTokenizer, match="'some-future-pre'"):
        tokenizer_from_gguf(path)
    with fast_transformers_gguf():
        ours = load_tokenizer(path)
    assert_same_tokenizer(ours, oracle(path))


def test_sentencepiece_file_goes_to_transformers(tmp_path):
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "h", "i", "e", "l", "o", "\u2581h", "hi", "\u2581hi", "he", "ll", "llo"]
    path = write_tokenizer_gguf(str(tmp_path / "t.gguf"), "llama", tokens, [2, 3, 3] + [1] * 12,
                                scores=[0.0] * 3 + [-float(i) for i in range(12)], bos=1, eos=2)
    with pytest.raises(UnsupportedGGUFTokenizer, match="'llama'"):
        tokenizer_from_gguf(path)
    with fast_transformers_gguf():
        ours = load_tokenizer(path)
    theirs = oracle(path)
    assert backend(ours) == backend(theirs)
    assert ours.encode("hi hello") == theirs.encode("hi hello") and len(ours.encode("hi hello")) > 2


def test_unsupported_tokenizer_model_is_named(tmp_path):
    path = write_tokenizer_gguf(str(tmp_path / "t.gguf"), "rwkv", ["a", "b"], [1, 1])
    with pytest.raises(UnsupportedGGUFTokenizer, match="'rwkv'"):
        tokenizer_from_gguf(path)
    with pytest.raises(FileNotFoundError, match="rwkv"):
        load_tokenizer(path)
