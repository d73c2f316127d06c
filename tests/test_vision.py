"""Qwen2-VL / Qwen2.5-VL / GLM-4.1V vision side against transformers: the image processor's pixels, the vision tower's
merged embeddings, and the M-RoPE positions; plus image loading's errors."""

import base64
import dataclasses
import functools
import io
import json

import jax
import numpy as np
import PIL.Image
import pytest
from flax import nnx

from sgjax.models.config import ModelConfig
from sgjax.models.vision.glm4v import bicubic_weights
from sgjax.models.vision.qwen2_vl import VisionConfig, segment_attention, vision_metadata
from sgjax.models.vision.spec import vision_spec
from sgjax.multimodal.glm4v_processor import Glm4vImageConfig
from sgjax.multimodal.image_io import ImageError, ImageTooLargeError, load_image
from sgjax.multimodal.mrope import mrope_positions, mrope_text_positions
from sgjax.multimodal.qwen2_vl_processor import Qwen2VLImageConfig, preprocess_images
from sgjax.platform.mesh import make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=160000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3]})
VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4, mlp_ratio=2),
    # windows of 16 px = 2x2 merge blocks; block 0 windowed, block 1 full
    "qwen2_5_vl": dict(depth=2, hidden_size=32, intermediate_size=48, out_hidden_size=32, num_heads=2, patch_size=4,
                       window_size=16, fullatt_block_indexes=[1]),
    # a 5x5 position table: the grids below resample it both up and down
    "glm4v": dict(depth=2, hidden_size=32, intermediate_size=48, out_hidden_size=32, num_heads=2, patch_size=4,
                  image_size=20),
}
CLASSES = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "glm4v": "Glm4v"}
# GLM-4 turns half of each head's features: 4 frequencies
TEXT_ROPE = {"glm4v": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                       "partial_rotary_factor": 0.5}}
# (t, h, w) patch grids: 4x6 merge blocks fill 2x3 windows exactly; 9x3 leaves partial windows
GRIDS = {"one image": [[1, 8, 12]], "two images": [[1, 8, 12], [1, 18, 6]]}


@pytest.fixture(scope="module", params=sorted(VISION))
def tiny_vl(request, tmp_path_factory):
    """(folder, transformers model, our tower loaded from the folder, its VisionSpec) of a tiny random Qwen2-VL,
    Qwen2.5-VL or GLM-4.1V."""
    name = CLASSES[request.param]
    config_class = getattr(transformers, f"{name}Config")
    model_class = getattr(transformers, f"{name}ForConditionalGeneration")
    torch.manual_seed(0)
    text = {**TEXT, "rope_parameters": TEXT_ROPE.get(request.param, TEXT["rope_parameters"])}
    model = model_class(config_class(text_config=text, vision_config=VISION[request.param])).eval()
    with torch.no_grad():  # HF's init (std 0.02) leaves activations too small for a comparison to mean much
        for name, p in model.model.visual.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name or "ln_q" in name else 0.3 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    spec = vision_spec(model_class.__name__)
    return path, model, spec.load_tower(path, make_mesh("1x1")), spec


def hf_tower_output(model, pixels: np.ndarray, grids) -> np.ndarray:
    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grids))
    return out.pooler_output.numpy()


BUCKET = 256  # patch rows every call is padded to, as the executor will: one compiled program per tower


@functools.partial(jax.jit, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})
def _encode(graphdef, state, pixels, meta):
    return nnx.merge(graphdef, state)(pixels, meta)


def encode(spec, tower, grids, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(random pixel rows for these grids, the tower's embeddings of them: only the real rows)."""
    cfg = tower.config
    n = int(np.prod(np.asarray(grids), axis=1).sum())
    pixels = np.random.default_rng(seed).standard_normal((BUCKET, cfg.patch_dim)).astype(np.float32)
    out = _encode(*nnx.split(tower), pixels, spec.metadata(grids, cfg, BUCKET))
    assert out.shape == (BUCKET // cfg.merge_unit, cfg.out_hidden_size)
    return pixels[:n], np.asarray(out)[: n // cfg.merge_unit]


@pytest.mark.parametrize("images", sorted(GRIDS))
def test_tower_matches_transformers(tiny_vl, images):
    _, model, tower, spec = tiny_vl
    pixels, out = encode(spec, tower, GRIDS[images])
    np.testing.assert_allclose(out, hf_tower_output(model, pixels, GRIDS[images]), atol=1e-4, rtol=1e-4)


def test_sharded_tower_gives_the_same_rows(tiny_vl):
    """Heads split over "tensor" (and the padding rows filled with noise) change nothing."""
    path, model, _, spec = tiny_vl
    grids = GRIDS["two images"]
    pixels, out = encode(spec, spec.load_tower(path, make_mesh("1x2")), grids, seed=1)
    np.testing.assert_allclose(out, hf_tower_output(model, pixels, grids), atol=1e-4, rtol=1e-4)


def test_tower_loads_from_a_state_dict_with_the_model_prefix(tiny_vl):
    path, model, _, spec = tiny_vl
    with open(f"{path}/config.json") as f:
        cfg = spec.config(json.load(f), "float32")
    state = {f"model.visual.{k}": v.numpy() for k, v in model.model.visual.state_dict().items()}
    grids = GRIDS["one image"]
    pixels, out = encode(spec, spec.load_tower(state, make_mesh("1x1"), cfg=cfg), grids)
    np.testing.assert_allclose(out, hf_tower_output(model, pixels, grids), atol=1e-4, rtol=1e-4)
    del state["model.visual.blocks.1.attn.proj.weight"]
    with pytest.raises(KeyError, match="blocks.1.attn.proj.weight"):
        spec.load_tower(state, make_mesh("1x1"), cfg=cfg)


@pytest.mark.parametrize("grid", [(2, 2), (4, 10), (5, 5), (18, 6)])
def test_glm4v_position_weights_resample_as_grid_sample(grid):
    """GLM's learned 5x5 position table resampled to a patch grid (smaller, larger, equal) by the host's separable
    bicubic weights equals torch's grid_sample (bicubic, align_corners=False, border), as Glm4vVisionEmbeddings
    calls it."""
    side, (h, w) = 5, grid
    table = np.random.default_rng(0).standard_normal((side, side, 3)).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    ours = np.einsum("na,nb,abe->ne", bicubic_weights(rows, h, side), bicubic_weights(cols, w, side), table)
    normed = torch.from_numpy(np.stack([(cols + 0.5) / w * 2 - 1, (rows + 0.5) / h * 2 - 1], -1).astype(np.float32))
    expected = torch.nn.functional.grid_sample(torch.from_numpy(table).permute(2, 0, 1)[None], normed[None, :, None],
                                               mode="bicubic", align_corners=False, padding_mode="border")
    np.testing.assert_allclose(ours, expected[0, :, :, 0].T.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [40, 64])
def test_segment_attention_by_query_blocks_equals_all_queries_at_once(n):
    """The towers' attention in blocks of 16 queries (the last one padded when 16 does not divide n) against
    numpy's dense block-diagonal softmax over the same segments (images and windows of uneven sizes)."""
    rng = np.random.default_rng(n)
    q, k, v = (rng.standard_normal((n, 2, 8)).astype(np.float32) for _ in range(3))
    segments = np.repeat(np.arange(4), [7, 20, 1, n - 28]).astype(np.int32)
    got = np.asarray(segment_attention(q, k, v, segments, 0.3, block=16))
    scores = np.einsum("qhd,khd->hqk", q, k) * 0.3
    scores = np.where(segments[None, :, None] == segments[None, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("hqk,khd->qhd", probs / probs.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_vision_metadata_rejects_a_too_small_bucket():
    cfg = VisionConfig.from_hf({"model_type": "qwen2_vl", "vision_config": VISION["qwen2_vl"]})
    with pytest.raises(ValueError, match="cannot hold 96 patches"):
        vision_metadata([[1, 8, 12]], cfg, num_patches=64)


def prompt_with_images(model, grids, texts) -> list[int]:
    """texts[0] <start> image... <end> texts[1] ...: token ids as the chat templates lay them out (Qwen2-VL's
    <|vision_start|>, GLM's <|begin_of_image|>)."""
    cfg = model.config
    start, end = (getattr(cfg, "vision_start_token_id", None) or cfg.image_start_token_id,
                  getattr(cfg, "vision_end_token_id", None) or cfg.image_end_token_id)
    ids = list(range(1, texts[0] + 1))
    for (t, h, w), n_text in zip(grids, texts[1:]):
        ids += [start] + [cfg.image_token_id] * (t * h * w // 4) + [end]
        ids += list(range(100, 100 + n_text))
    return ids


@pytest.mark.parametrize("grids, texts", [
    ([], [7]),
    ([[1, 8, 12]], [3, 5]),
    ([[1, 8, 12], [1, 18, 6]], [2, 4, 3]),
    ([[1, 18, 6], [1, 4, 4]], [0, 0, 6]),  # image first thing in the prompt; two images back to back
])
def test_mrope_positions_match_get_rope_index(tiny_vl, grids, texts):
    _, model, _, _ = tiny_vl
    ids = prompt_with_images(model, grids, texts)
    extra = [5, 6, 7]  # tokens decoded after the prompt
    full = torch.tensor([ids + extra])
    expected, expected_delta = model.model.get_rope_index(
        full[:, : len(ids)], (full[:, : len(ids)] == model.config.image_token_id).int(),
        image_grid_thw=torch.tensor(grids) if grids else None)
    positions, delta = mrope_positions(ids, grids, image_token_id=model.config.image_token_id, spatial_merge_size=2)
    np.testing.assert_array_equal(positions, expected[:, 0].numpy())
    assert delta == int(expected_delta)
    # The decoded tokens continue as text: HF's positions over prompt + decoded tokens end the same way.
    with_decode, _ = model.model.get_rope_index(full, (full == model.config.image_token_id).int(),
                                                image_grid_thw=torch.tensor(grids) if grids else None)
    np.testing.assert_array_equal(mrope_text_positions(len(ids), len(extra), delta),
                                  with_decode[:, 0, len(ids):].numpy())


def test_mrope_positions_reject_a_placeholder_count_mismatch():
    ids = [1, 2] + [9] * 5 + [3]
    with pytest.raises(ValueError, match="5 image placeholder tokens; its 1 images need 6"):
        mrope_positions(ids, [[1, 4, 6]], image_token_id=9, spatial_merge_size=2)


def random_image(rng, height: int, width: int, mode: str) -> PIL.Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


SMALL = {"patch_size": 8, "min_pixels": 16 * 16 * 4, "max_pixels": 64 * 64 * 6}  # forces up- and down-scaling


@pytest.mark.parametrize("processor, kwargs", [
    ("Qwen2VLImageProcessorPil", {}),  # Qwen2-VL's defaults: patch 14, 56*56 to 28*28*1280 pixels
    ("Qwen2VLImageProcessorPil", SMALL),
    ("Glm4vImageProcessorPil", {}),  # GLM's defaults: 112*112 to 28*28*15000 pixels, counted twice
    ("Glm4vImageProcessorPil", SMALL),
])
def test_image_processor_matches_transformers(processor, kwargs, tmp_path):
    rng = np.random.default_rng(0)
    images = [random_image(rng, 37, 91, "RGB"), random_image(rng, 300, 211, "RGBA"), random_image(rng, 15, 19, "L"),
              random_image(rng, 640, 480, "RGB"), random_image(rng, 9, 200, "RGB")]  # GLM scales a thin side up first
    config_class = Glm4vImageConfig if processor.startswith("Glm4v") else Qwen2VLImageConfig
    hf_kwargs = dict(kwargs)
    if config_class is Glm4vImageConfig and kwargs:  # GLM's processor takes the bounds only as `size`
        hf_kwargs["size"] = {"shortest_edge": hf_kwargs.pop("min_pixels"), "longest_edge": hf_kwargs.pop("max_pixels")}
    hf = getattr(transformers, processor)(**hf_kwargs)
    expected = hf(images=images, return_tensors="np")
    hf.save_pretrained(str(tmp_path))
    cfg = config_class.from_pretrained(str(tmp_path))
    assert cfg == config_class(**kwargs)
    got = preprocess_images(images, cfg)
    np.testing.assert_array_equal(got.image_grid_thw, expected["image_grid_thw"])
    np.testing.assert_allclose(got.pixel_values, expected["pixel_values"], atol=1e-6, rtol=0)
    assert sum(got.num_tokens(2)) * 4 == len(got.pixel_values)


def png_bytes(image: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_images_load_from_data_urls_bytes_base64_and_paths(tmp_path):
    image = random_image(np.random.default_rng(0), 20, 30, "RGBA")
    data = png_bytes(image)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for source in (f"data:image/png;base64,{b64}", data, b64, str(path), f"file://{path}"):
        loaded = load_image(source)
        assert loaded.size == (30, 20) and loaded.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))


@pytest.mark.parametrize("source, error, match", [
    (b"definitely not an image", ImageError, "cannot decode the image"),
    ("data:image/png;base64," + base64.b64encode(b"GIF89a broken").decode(), ImageError, "cannot decode"),
    ("data:image/png;base64,%%%", ImageError, "invalid base64"),
    ("data:text/plain;base64,aGVsbG8=", ImageError, "media type 'text/plain'"),
    ("http://example.com/cat.png", ImageError, "remote image URLs are not fetched"),
    ("/no/such/file.png", ImageError, "not a data: URL, an existing file, or base64"),
    (b"", ImageError, "empty"),
])
def test_bad_images_are_named(source, error, match):
    with pytest.raises(error, match=match):
        load_image(source)


def test_truncated_and_oversized_images_are_refused():
    data = png_bytes(random_image(np.random.default_rng(0), 64, 64, "RGB"))
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(data[: len(data) // 2])
    with pytest.raises(ImageTooLargeError, match="64x64 = 4096 pixels; the limit is 4000"):
        load_image(data, max_pixels=4000)
    assert load_image(data, max_pixels=4096).size == (64, 64)


def test_glm46v_configs_are_read_as_glm4v_and_its_moe_decoder_is_refused():
    """GLM-4.6V-Flash's Glm46V config wraps GLM-4.1V's tower and decoder: the same ModelConfig; GLM-4.6V's
    mixture-of-experts decoder is refused by name (it comes with the MoE models)."""
    text = {**TEXT, "rope_parameters": TEXT_ROPE["glm4v"]}
    glm4v = ModelConfig.from_hf(transformers.Glm4vConfig(text_config=text, vision_config=VISION["glm4v"]),
                                "Glm4vForConditionalGeneration")
    glm46v = ModelConfig.from_hf(transformers.Glm46VConfig(
        text_config={**text, "model_type": "glm4v_text"}, vision_config={**VISION["glm4v"], "model_type": "glm4v_vision"}),
        "Glm46VForConditionalGeneration")
    assert glm46v == dataclasses.replace(glm4v, architecture="Glm46VForConditionalGeneration")
    assert (glm4v.rotary_dim, glm4v.rope_interleaved, glm4v.checkpoint_gate_up) == (8, True, True)
    moe = transformers.Glm46VConfig(text_config={**text, "model_type": "glm4v_moe_text"},
                                    vision_config={**VISION["glm4v"], "model_type": "glm4v_vision"})
    with pytest.raises(ValueError, match="'glm4v_moe_text' decoder under a vision tower is not supported"):
        ModelConfig.from_hf(moe, "Glm46VForConditionalGeneration")
