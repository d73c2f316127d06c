"""LLaVA-1.5 and LLaVA-NeXT against transformers: the CLIP image processors' pixels, the tower + projector's rows
(anyres tiles, unpadding and image_newline for NeXT), and through the Engine: greedy tokens with one and two images
of different sizes, a repeated image's tokens from the cache, and one request from the OpenAI client."""

import base64
import functools
import io
import json

import jax
import numpy as np
import openai
import PIL.Image
import pytest
import requests
from flax import nnx

from sgjax.engine import Engine
from sgjax.engine.image_inputs import ImagePlaceholderError
from sgjax.models.config import ModelConfig
from sgjax.models.vision.llava import (
    LlavaVisionConfig,
    llava_metadata,
    load_llava_tower,
)
from sgjax.multimodal.clip_processor import ClipImageConfig, preprocess_image
from sgjax.platform.mesh import make_mesh
from sgjax.testing.tiny_models import make_tokenizer
from tests.e2e.test_server import LiveServer
from tests.test_engine import check_pages_accounted

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE = 310
TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2)
# 16 px tiles of 4 px patches: 16 patches a tile. Three layers, so "the second-to-last" is not the first or last.
S = 16
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=S,
              patch_size=4)
PINPOINTS = [[S, 2 * S], [2 * S, S], [2 * S, 2 * S]]
TILE = {"size": {"shortest_edge": S}, "crop_size": {"height": S, "width": S}}
GREEDY = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}


def random_image(seed: int, height: int, width: int, mode: str = "RGB") -> PIL.Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


# NeXT: the wide image takes the 16x32 pinpoint (2 tiles + the whole), the tall one 32x16, each unpadded apart
CAT, DOG = random_image(1, 30, 50), random_image(2, 61, 20)
ONE_IMAGE = [5, 6, 7, IMAGE, 11, 12, 13]
TWO_IMAGES = [5, IMAGE, 20, 21, IMAGE, 22, 23]


@pytest.mark.parametrize("processor, kwargs", [
    ("CLIPImageProcessorPil", TILE),
    ("CLIPImageProcessorPil", {"size": {"shortest_edge": 32}, "crop_size": {"height": 24, "width": 30}}),
    ("LlavaImageProcessorPil", {**TILE, "do_pad": True}),  # padded to a square of the mean color first
    ("LlavaNextImageProcessorPil", {**TILE, "image_grid_pinpoints": PINPOINTS}),
])
def test_image_processor_matches_transformers(processor, kwargs, tmp_path):
    images = [random_image(0, 37, 91), random_image(1, 300, 211, "RGBA"), random_image(2, 15, 19, "L"),
              random_image(3, 64, 48)]
    hf = getattr(transformers, processor)(**kwargs)
    hf.save_pretrained(str(tmp_path))
    cfg = ClipImageConfig.from_pretrained(str(tmp_path))
    for image in images:
        expected = hf(images=[image], return_tensors="np")
        pixels, grid = preprocess_image(image, cfg)
        assert grid == (len(pixels), image.height, image.width)
        np.testing.assert_allclose(pixels, expected["pixel_values"].reshape(len(pixels), -1), atol=1e-6, rtol=0)


def make_llava(name: str, path: str, **config):
    """A tiny random LLaVA (or NeXT) with its image processor and a tokenizer whose <image> is IMAGE, saved to path."""
    torch.manual_seed(0)
    if name == "llava":
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
            text_config=TEXT, vision_config=VISION, image_token_id=IMAGE, **config))
        processor = transformers.LlavaImageProcessorPil(**TILE)
    else:
        model = transformers.LlavaNextForConditionalGeneration(transformers.LlavaNextConfig(
            text_config=TEXT, vision_config=VISION, image_token_id=IMAGE, image_grid_pinpoints=PINPOINTS, **config))
        processor = transformers.LlavaNextImageProcessorPil(**TILE, image_grid_pinpoints=PINPOINTS)
    model.eval()
    with torch.no_grad():  # HF's init (std 0.02) leaves activations too small for a comparison to mean much
        for key, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in key else 0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer = make_tokenizer(300)
    tokenizer.add_special_tokens({"additional_special_tokens": [f"<|unused{i}|>" for i in range(IMAGE - 300)]
                                  + ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE
    tokenizer.save_pretrained(path)
    return model


def hf_image_rows(name: str, model, processed) -> list[np.ndarray]:
    """transformers' projected rows of each image, from our pixel values (equal to its processor's)."""
    with torch.no_grad():
        if name == "llava":
            tiles = np.concatenate([pixels for pixels, _ in processed])
            out = model.model.get_image_features(torch.from_numpy(tiles).reshape(-1, 3, S, S))
        else:
            out = model.model.get_image_features(torch.from_numpy(pad_tiles(processed)),
                                                 torch.tensor([grid[1:] for _, grid in processed]))
    return [rows.numpy() for rows in out.pooler_output]


def test_tower_and_projector_match_transformers(llava):
    """LLaVA-1.5: the second-to-last layer, class token dropped; NeXT: anyres tiles, unpadded, with newlines. Run
    as the engine runs them: images of several sizes in one padded call, rows into the embedding pool."""
    name, model, engine = llava
    images = [DOG, CAT, DOG]  # as the greedy test's batch has them: the same tower programs
    prepared = [engine.requests.images.prepare([IMAGE], [image])[1].images[0] for image in images]
    processed = [(image.pixel_values, image.grid_thw) for image in prepared]
    pool = engine.runner.images
    rows = [pool.alloc(image.num_tokens) for image in prepared]
    try:
        pool.encode([(pixels, grid, r) for (pixels, grid), r in zip(processed, rows)])
        got = [np.asarray(pool.pool)[r] for r in rows]
    finally:
        for r in rows:
            pool.free(r)
    for ours, theirs in zip(got, hf_image_rows(name, model, processed), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)


@functools.partial(jax.jit, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})
def _encode(graphdef, state, pixels, meta):
    return nnx.merge(graphdef, state)(pixels, meta)


def test_several_feature_layers_and_the_full_strategy_match_transformers(tmp_path):
    """vision_feature_layer [0, -1] (the embeddings and the last layer, concatenated), class token kept; the tower
    sharded over two devices; its weights under the hub checkpoints' names."""
    model = make_llava("llava", str(tmp_path), vision_feature_layer=[0, -1], vision_feature_select_strategy="full")
    with open(tmp_path / "config.json") as f:
        cfg = LlavaVisionConfig.from_hf(json.load(f))
    assert cfg.feature_layers == (0, 3) and cfg.tile_tokens == 17
    tower = load_llava_tower(str(tmp_path), make_mesh("1x2"), cfg=cfg)  # heads split over "tensor"
    processed = [preprocess_image(image, ClipImageConfig.from_pretrained(str(tmp_path))) for image in (CAT, DOG)]
    pixels = np.zeros((4, cfg.input_dim), np.float32)  # padded to a bucket of 4 tiles, as the engine does
    pixels[:2] = np.concatenate([p for p, _ in processed])
    out = _encode(*nnx.split(tower), pixels, llava_metadata([g for _, g in processed], cfg, 4))
    assert out.shape == (cfg.output_rows(4), TEXT["hidden_size"])
    expected = np.concatenate(hf_image_rows("llava", model, processed))
    np.testing.assert_allclose(np.asarray(out)[:len(expected)], expected, atol=2e-4, rtol=1e-4)
    # The llava-hf checkpoints name the tower's tensors vision_tower.vision_model.*: the same weights load.
    hub = {k.replace("vision_tower.", "vision_tower.vision_model."): v.numpy()
           for k, v in model.model.state_dict().items() if not k.startswith("language_model.")}
    from_hub = load_llava_tower(hub, make_mesh("1x1"), cfg=cfg)
    for (path, ours), (_, theirs) in zip(nnx.to_flat_state(nnx.state(tower)), nnx.to_flat_state(nnx.state(from_hub))):
        np.testing.assert_array_equal(np.asarray(ours[...]), np.asarray(theirs[...]), err_msg=str(path))


def pad_tiles(processed) -> np.ndarray:
    """transformers' NeXT pixel_values: [images, most tiles, 3, S, S], zero tiles after each image's."""
    most = max(len(p) for p, _ in processed)
    out = np.zeros((len(processed), most, 3, S, S), np.float32)
    for k, (p, _) in enumerate(processed):
        out[k, :len(p)] = p.reshape(-1, 3, S, S)
    return out


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def llava(request, tmp_path_factory):
    """(name, transformers model, engine) of a tiny random LLaVA-1.5 or LLaVA-NeXT."""
    path = str(tmp_path_factory.mktemp(request.param))
    model = make_llava(request.param, path)
    # Chunks of 12 tokens split the image spans (16 and more tokens). Both models' pools have the same rows, so
    # their steps are the same programs (compiled once, then from the persistent cache).
    engine = Engine(path, dtype="float32", page_size=4, max_running_requests=4, chunked_prefill_size=12,
                    num_pages=128, image_pool_rows=400, attention_backend="reference")
    yield request.param, model, engine
    engine.shutdown()


def hf_generate(name, model, engine, prompt, images, n: int) -> list[int]:
    """transformers' greedy tokens for the prompt with its placeholders expanded as the engine does."""
    ids, mm = engine.requests.images.prepare(list(prompt), images)
    processed = [(i.pixel_values, i.grid_thw) for i in mm.images]
    inputs = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    if name == "llava":
        inputs["pixel_values"] = torch.from_numpy(np.concatenate([p for p, _ in processed])).reshape(-1, 3, S, S)
    else:
        inputs["pixel_values"] = torch.from_numpy(pad_tiles(processed))
        inputs["image_sizes"] = torch.tensor([g[1:] for _, g in processed])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(ids):].tolist()


def test_greedy_tokens_match_transformers_generate(llava):
    """One image and two images of different sizes, run together (their tiles encoded in one tower call)."""
    name, model, engine = llava
    engine.flush_cache()
    results = engine.generate(input_ids=[ONE_IMAGE, TWO_IMAGES], image_data=[DOG, [CAT, DOG]], sampling_params=GREEDY)
    assert results[0]["output_ids"] == hf_generate(name, model, engine, ONE_IMAGE, [DOG], 5)
    assert results[1]["output_ids"] == hf_generate(name, model, engine, TWO_IMAGES, [CAT, DOG], 5)
    if name == "llava":
        assert results[0]["meta_info"]["prompt_tokens"] == len(ONE_IMAGE) - 1 + 16  # one tile, no class token
    check_pages_accounted(engine)
    assert engine.runner.images.num_free == engine.runner.images.num_rows


def data_url(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("llava", ["llava"], indirect=True)  # the server path is the same for NeXT: once is enough
def test_images_through_the_openai_client_and_generate_with_a_repeated_image_cached(llava):
    """The official openai client sends an image as a data URL: transformers' greedy tokens for the chat with the
    model's <image>; the same chat again finds the image's tokens cached (usage), skips the tower, and answers
    the same. /generate takes image_data."""
    name, model, engine = llava
    engine.flush_cache()
    server = LiveServer(engine)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        content = [{"type": "text", "text": "look: "}, {"type": "image_url", "image_url": {"url": data_url(CAT)}},
                   {"type": "text", "text": " what?"}]
        ask = dict(model=client.models.list().data[0].id, max_tokens=4, temperature=0, extra_body={"ignore_eos": True},
                   messages=[{"role": "user", "content": content}])
        first = client.chat.completions.create(**ask)
        assert engine.image_placeholder == "<image>"
        prompt = engine.apply_chat_template([{"role": "user", "content": "look: <image> what?"}])
        want = hf_generate(name, model, engine, prompt, [CAT], 4)
        assert first.choices[0].message.content == engine.tokenizer.decode(want, skip_special_tokens=True)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        encoded = engine.core.launcher.images.num_encoded
        again = client.chat.completions.create(**ask)
        tokens = first.usage.prompt_tokens
        assert again.usage.prompt_tokens_details.cached_tokens >= tokens - 4  # up to the last whole page
        assert engine.core.launcher.images.num_encoded == encoded  # the tower did not run
        assert again.choices[0].message.content == first.choices[0].message.content
        native = requests.post(server.url + "/generate", json={
            "input_ids": ONE_IMAGE, "image_data": data_url(DOG), "sampling_params": GREEDY}).json()
        assert native["output_ids"] == hf_generate(name, model, engine, ONE_IMAGE, [DOG], GREEDY["max_new_tokens"])
    finally:
        server.stop()
    check_pages_accounted(engine)


def test_images_side_by_side_take_one_placeholder_each(llava):
    """Two image parts with no text between them render as two image tokens in a row: one per image."""
    _, _, engine = llava
    images = engine.requests.images
    ids, mm = images.prepare([5, IMAGE, IMAGE, 6], [CAT, DOG])
    n = [image.num_tokens for image in mm.images]
    assert ids == [5] + [IMAGE] * sum(n) + [6]
    assert [image.offset for image in mm.images] == [1, 1 + n[0]]
    with pytest.raises(ImagePlaceholderError, match="prompt has 1 image placeholders; 3 images were given"):
        images.prepare([5, IMAGE, IMAGE, 6], [CAT, DOG, CAT])
    with pytest.raises(ImagePlaceholderError, match=f"image 1 takes {n[1]} placeholder tokens; the prompt has 2"):
        images.prepare([5, IMAGE, 7, IMAGE, IMAGE, 6], [CAT, DOG])


def test_unsupported_configs_and_images_are_refused_by_name():
    config = transformers.LlavaConfig(text_config=TEXT, vision_config=VISION, image_token_id=IMAGE).to_dict()
    siglip = {**config, "vision_config": {**config["vision_config"], "model_type": "siglip_vision_model"}}
    with pytest.raises(ValueError, match="vision tower 'siglip_vision_model' is not supported here"):
        LlavaVisionConfig.from_hf(siglip)
    with pytest.raises(ValueError, match="vision_feature_layer .* outside the tower's 4 hidden states"):
        LlavaVisionConfig.from_hf({**config, "vision_feature_layer": -5})
    with pytest.raises(ValueError, match="strategy 'full' does not fit"):
        LlavaVisionConfig.from_hf({**config, "model_type": "llava_next", "image_grid_pinpoints": PINPOINTS,
                                   "vision_feature_select_strategy": "full"})
    with pytest.raises(ValueError, match="image is 3x700; its aspect ratio must be below 200"):
        preprocess_image(random_image(0, 700, 3), ClipImageConfig())


@pytest.mark.parametrize("text_type, flags", [("llama", dict(qkv_bias=False, sliding_windows=(None, None))),
                                              ("qwen2", dict(qkv_bias=True)),
                                              ("mistral", dict(sliding_windows=(8, 8)))])
def test_the_decoder_follows_its_text_config(text_type, flags):
    """LLaVA over a Llama, Qwen2 or Mistral decoder: the text config's family flags, 1D positions."""
    text = {**TEXT, "model_type": text_type, **({"sliding_window": 8} if text_type == "mistral" else {})}
    hf = transformers.LlavaConfig(text_config=text, vision_config=VISION, image_token_id=IMAGE)
    cfg = ModelConfig.from_hf(hf, "LlavaForConditionalGeneration", "float32")
    assert {k: getattr(cfg, k) for k in flags} == flags
    assert cfg.mrope_section == () and cfg.image_token_id == IMAGE and cfg.vision.tile_tokens == 16
