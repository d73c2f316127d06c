"""Qwen2-VL / Qwen2.5-VL / GLM-4.1V through the Engine against transformers: first-step logprobs and greedy tokens with one and
two images, image KV reuse through the radix cache (keyed by image content), chunked prefill across image spans,
preemption, and bad image input as ValueErrors naming the problem."""

import base64
import io
import json

import numpy as np
import openai
import PIL.Image
import pytest
import requests

import sgjax as sgl

from sgjax.config import EngineArgs
from sgjax.engine import Engine
from sgjax.engine.image_inputs import (
    ImagePlaceholderError,
    ImagesNotSupportedError,
    TooManyImagesError,
)
from sgjax.engine.request_builder import RequestBuilder
from sgjax.multimodal.image_io import ImageError
from sgjax.testing.tiny_models import make_tokenizer
from tests.e2e.test_server import LiveServer
from tests.test_engine import check_pages_accounted

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE, START, END = 310, 308, 309  # image placeholder, vision start / end token ids
TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, mlp_ratio=2),
    # windows of 16 px = 2x2 merge blocks; block 0 windowed, block 1 full
    "qwen2_5_vl": dict(depth=2, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=2, patch_size=4,
                       window_size=16, fullatt_block_indexes=[1]),
    "glm4v": dict(depth=2, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=2, patch_size=4,
                  image_size=20),
}
CLASSES = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "glm4v": "Glm4v"}
# GLM-4 turns half of each head: heads of 32 leave 8 frequencies for the same M-RoPE sections
TEXT_OF = {"glm4v": {**TEXT, "num_attention_heads": 2, "num_key_value_heads": 1, "rope_parameters": {
    "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "partial_rotary_factor": 0.5}}}
# Each family's config keys for the tokens around an image and its tokens' text: start, end, placeholder
QWEN_TOKENS = (("vision_start_token_id", "vision_end_token_id"), ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"))
IMAGE_TOKENS = {"glm4v": (("image_start_token_id", "image_end_token_id"),
                          ("<|begin_of_image|>", "<|end_of_image|>", "<|image|>"))}
QWEN = ["qwen2_5_vl", "qwen2_vl"]  # engine behaviour no model changes (preemption, input errors) runs on these only
GREEDY = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}


def random_image(seed: int, height: int, width: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# 24x32 px: 6x8 patches of 4 px, 12 placeholder tokens; 16x40 px: 4x10 patches, 10 tokens
CAT, DOG = random_image(1, 24, 32), random_image(2, 16, 40)
CAT_PNG = io.BytesIO()
CAT.save(CAT_PNG, format="PNG")
CAT_PNG = CAT_PNG.getvalue()
ONE_IMAGE = [5, 6, 7, START, IMAGE, END, 11, 12, 13]
TWO_IMAGES = [5, START, IMAGE, END, 20, 21, START, IMAGE, END, 22, 23]


@pytest.fixture(scope="module", params=sorted(VISION))
def vl(request, tmp_path_factory):
    """(name, transformers model, engine) of a tiny random Qwen2-VL, Qwen2.5-VL or GLM-4.1V saved with
    save_pretrained."""
    name = request.param
    config_class = getattr(transformers, f"{CLASSES[name]}Config")
    model_class = getattr(transformers, f"{CLASSES[name]}ForConditionalGeneration")
    (start_key, end_key), token_texts = IMAGE_TOKENS.get(name, QWEN_TOKENS)
    torch.manual_seed(0)
    model = model_class(config_class(text_config=TEXT_OF.get(name, TEXT), vision_config=VISION[name],
                                     image_token_id=IMAGE, **{start_key: START, end_key: END})).eval()
    with torch.no_grad():  # HF's init (std 0.02) leaves activations too small for a comparison to mean much
        for key, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in key or "ln_q" in key else 0.3 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    tokenizer = make_tokenizer(300)  # + special tokens at the ids the config names, so chat text can hold images
    tokenizer.add_special_tokens({"additional_special_tokens": [f"<|unused{i}|>" for i in range(START - 300)] + [
        *token_texts]})
    assert tokenizer.convert_tokens_to_ids(list(token_texts)) == [START, END, IMAGE]
    tokenizer.save_pretrained(path)
    with open(f"{path}/preprocessor_config.json", "w") as f:
        json.dump({"min_pixels": 64, "max_pixels": 48 * 48, "patch_size": 4, "merge_size": 2}, f)
    # Chunks of 16 tokens split the image spans; 23 usable pages of 4 tokens make 4 concurrent requests preempt.
    engine = Engine(path, dtype="float32", page_size=4, max_running_requests=4, chunked_prefill_size=16,
                    num_pages=24, attention_backend="reference")
    yield name, model, engine
    engine.shutdown()


def hf_inputs(engine, prompt, images) -> dict:
    """transformers' inputs for the prompt, placeholders expanded and pixels processed as the engine does."""
    ids, mm = engine.requests.images.prepare(list(prompt), images)
    ids_t = torch.tensor([ids])
    return dict(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), mm_token_type_ids=(ids_t == IMAGE).int(),
                pixel_values=torch.from_numpy(np.concatenate([i.pixel_values for i in mm.images])),
                image_grid_thw=torch.tensor([i.grid_thw for i in mm.images]))


def hf_generate(model, engine, prompt, images, n: int) -> list[int]:
    inputs = hf_inputs(engine, prompt, images)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_first_step_logprobs_match_transformers(vl):
    _, model, engine = vl
    result = engine.generate(input_ids=ONE_IMAGE, image_data=CAT,
                             sampling_params={**GREEDY, "max_new_tokens": 1, "top_logprobs_num": 5})
    with torch.no_grad():
        logits = model(**hf_inputs(engine, ONE_IMAGE, [CAT])).logits[0, -1].double()
    expected = torch.log_softmax(logits, -1).topk(5)
    top = result["meta_info"]["output_top_logprobs"][0]
    assert [t for _, t in top] == expected.indices.tolist()
    np.testing.assert_allclose([lp for lp, _ in top], expected.values.numpy(), atol=1e-4)
    assert result["meta_info"]["prompt_tokens"] == len(ONE_IMAGE) - 1 + 12  # the placeholder became 12 tokens


def test_greedy_tokens_match_transformers_generate(vl):
    """One image and two images of different sizes, run together (their images encoded in one tower call)."""
    _, model, engine = vl
    encoded = engine.core.launcher.images.num_encoded
    engine.flush_cache()
    results = engine.generate(input_ids=[ONE_IMAGE, TWO_IMAGES], image_data=[DOG, [CAT, DOG]],
                              sampling_params=GREEDY)
    assert results[0]["output_ids"] == hf_generate(model, engine, ONE_IMAGE, [DOG], GREEDY["max_new_tokens"])
    assert results[1]["output_ids"] == hf_generate(model, engine, TWO_IMAGES, [CAT, DOG], GREEDY["max_new_tokens"])
    assert engine.core.launcher.images.num_encoded == encoded + 3
    check_pages_accounted(engine)
    assert engine.runner.images.num_free == engine.runner.images.num_rows


def test_a_repeated_image_hits_the_cache_and_a_different_one_does_not(vl):
    _, _, engine = vl
    images = engine.core.launcher.images
    engine.flush_cache()
    first = engine.generate(input_ids=ONE_IMAGE, image_data=CAT, sampling_params=GREEDY)
    assert first["meta_info"]["cached_tokens"] == 0
    encoded = images.num_encoded
    # The next turn: the same image, the answer, a new question. Its image's tokens come from the cache.
    turn = ONE_IMAGE + first["output_ids"] + [30, 31, 32]
    again = engine.generate(input_ids=turn, image_data=CAT, sampling_params=GREEDY)
    image_end = ONE_IMAGE.index(IMAGE) + 12
    assert again["meta_info"]["cached_tokens"] >= image_end
    assert images.num_encoded == encoded  # the tower did not run
    engine.flush_cache()
    uncached = engine.generate(input_ids=turn, image_data=CAT, sampling_params=GREEDY)
    assert uncached["meta_info"]["cached_tokens"] == 0
    assert again["output_ids"] == uncached["output_ids"]
    # Another image after the same text shares only the text's whole pages.
    other = engine.generate(input_ids=ONE_IMAGE, image_data=random_image(3, 24, 32), sampling_params=GREEDY)
    assert other["meta_info"]["cached_tokens"] <= ONE_IMAGE.index(IMAGE)
    assert other["output_ids"] != first["output_ids"]
    check_pages_accounted(engine)


@pytest.mark.parametrize("vl", QWEN, indirect=True)
def test_preempted_requests_recompute_their_images(vl):
    """Four concurrent image requests overflow the 23-page pool: some are preempted and recomputed, and each gets
    the tokens it gets alone."""
    _, _, engine = vl
    prompts = [ONE_IMAGE + [40 + k] * 3 for k in range(4)]
    images = [CAT, DOG, CAT, random_image(4, 24, 32)]
    params = {**GREEDY, "max_new_tokens": 8}
    engine.flush_cache()
    alone = []
    for prompt, image in zip(prompts, images):
        alone.append(engine.generate(input_ids=prompt, image_data=image, sampling_params=params)["output_ids"])
        engine.flush_cache()
    preemptions = engine.scheduler.num_preemptions
    together = engine.generate(input_ids=prompts, image_data=images, sampling_params=params)
    assert engine.scheduler.num_preemptions > preemptions
    assert [r["output_ids"] for r in together] == alone
    check_pages_accounted(engine)
    assert engine.runner.images.num_free == engine.runner.images.num_rows


@pytest.mark.parametrize("vl", QWEN, indirect=True)
def test_bad_image_input_raises_value_errors_naming_the_problem(vl):
    _, _, engine = vl
    with pytest.raises(ImagePlaceholderError, match="prompt has 1 image placeholders; 2 images were given"):
        engine.generate(input_ids=ONE_IMAGE, image_data=[CAT, DOG])
    with pytest.raises(ImagePlaceholderError, match="prompt has 0 image placeholders; 1 images"):
        engine.generate(input_ids=[5, 6, 7], image_data=CAT)
    with pytest.raises(ImagePlaceholderError, match="image 0 takes 12 placeholder tokens; the prompt has 3"):
        engine.generate(input_ids=[5, IMAGE, IMAGE, IMAGE, 6], image_data=CAT)
    with pytest.raises(TooManyImagesError, match="17 images; at most 16"):
        engine.generate(input_ids=[IMAGE, 5] * 17, image_data=[CAT] * 17)
    with pytest.raises(ImageError, match="image 0: cannot decode the image"):
        engine.generate(input_ids=ONE_IMAGE, image_data=b"not an image at all")
    assert issubclass(ImagesNotSupportedError, ValueError)


def data_url(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_images_through_the_openai_client_the_native_api_and_the_frontend_language(vl):
    """A live server on the model: the official openai client sends an image as a data URL in a chat message,
    /generate takes image_data, and a frontend program with sgl.image runs over RuntimeEndpoint; each answers
    with transformers' greedy tokens for the prompt with the model's image placeholder, and a second turn over
    the same image finds the image's tokens cached (usage)."""
    family, model, engine = vl
    server = LiveServer(engine)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        name = client.models.list().data[0].id
        content = [{"type": "text", "text": "look: "}, {"type": "image_url", "image_url": {"url": data_url(CAT)}},
                   {"type": "text", "text": " what?"}]
        reply = client.chat.completions.create(model=name, max_tokens=4, temperature=0, extra_body={"ignore_eos": True},
                                               messages=[{"role": "user", "content": content}])
        placeholder = engine.image_placeholder
        start, end, image = IMAGE_TOKENS.get(family, QWEN_TOKENS)[1]
        assert placeholder == start + image + end
        prompt = engine.apply_chat_template([{"role": "user", "content": f"look: {placeholder} what?"}])
        want = hf_generate(model, engine, prompt, [CAT], 4)
        assert reply.choices[0].message.content == engine.tokenizer.decode(want)
        again = client.chat.completions.create(model=name, max_tokens=4, temperature=0, extra_body={"ignore_eos": True},
                                               messages=[{"role": "user", "content": content}])
        assert again.usage.prompt_tokens_details.cached_tokens >= len(prompt) + 12 - 1 - 4  # up to the last page

        native = requests.post(server.url + "/generate", json={
            "input_ids": ONE_IMAGE, "image_data": data_url(DOG), "sampling_params": GREEDY}).json()
        assert native["output_ids"] == hf_generate(model, engine, ONE_IMAGE, [DOG], GREEDY["max_new_tokens"])

        @sgl.function
        def describe(s, image):
            s += sgl.user(sgl.image(image) + " what?")
            s += sgl.assistant(sgl.gen("answer", max_tokens=4, temperature=0, ignore_eos=True, return_logprob=True))

        state = describe.run(image=CAT_PNG, backend=sgl.RuntimeEndpoint(server.url))
        assert state.error() is None
        asked = engine.tokenize(state.text()[:state.text().rindex(state["answer"])])
        got = [tok for _, tok, _ in state.get_meta_info("answer")["output_token_logprobs"]]
        assert got == hf_generate(model, engine, asked, [CAT], 4)
        refused = requests.post(server.url + "/generate", json={"input_ids": ONE_IMAGE, "image_data": "bm90IGFuIGltYWdl",
                                                                "sampling_params": GREEDY})
        assert refused.status_code == 400 and "image" in refused.json()["error"]["message"]
    finally:
        server.stop()


def test_images_sent_to_a_text_only_model_are_refused():
    builder = RequestBuilder(EngineArgs(model_path="tiny-llama"), None, None, 512, 128, 100, images=None)
    with pytest.raises(ImagesNotSupportedError, match="tiny-llama is a text-only model"):
        builder.images_per_prompt(CAT, 1, True)
    assert builder.images_per_prompt(None, 1, True) is None
