"""Loader: errors that name the problem, dummy weights, and sharded placement."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax.platform.mesh import make_mesh
from sgjax.models.loader import CheckpointTensors, load_model, load_tokenizer


@pytest.fixture
def llama_copy(tiny_models, tmp_path):
    path, _ = tiny_models("llama")
    dst = tmp_path / "model"
    shutil.copytree(path, dst)
    return dst


def test_missing_shard_is_named(llama_copy):
    index = json.loads((llama_copy / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(llama_copy / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        load_model(str(llama_copy), make_mesh("1x1"))


def test_missing_tensor_is_named(llama_copy):
    # Drop one tensor from the index and its shard's header: loading must name that tensor.
    index_path = llama_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shard = index["weight_map"].pop(name)
    index_path.write_text(json.dumps(index))
    from safetensors.numpy import load_file, save_file

    tensors = {k: v for k, v in load_file(str(llama_copy / shard)).items() if k != name}
    save_file(tensors, str(llama_copy / shard), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        load_model(str(llama_copy), make_mesh("1x1"))


def edit_config(folder, **changes) -> None:
    """Change fields of the checkpoint's config.json (not its tensors)."""
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_shape_mismatch_is_named(llama_copy):
    edit_config(llama_copy, intermediate_size=96)  # checkpoint has 128
    with pytest.raises(ValueError, match=r"down_proj\.weight.*\(64, 128\).*\(64, 96\)"):
        load_model(str(llama_copy), make_mesh("1x1"))


def test_fused_projection_part_mismatch_is_named(llama_copy):
    # q/k/v load as one fused parameter: a part whose shape disagrees with config.json is named.
    edit_config(llama_copy, num_key_value_heads=2)  # checkpoint has 4
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.k_proj\.bias' has shape \(32,\).*implies \(16,\)"):
        load_model(str(llama_copy), make_mesh("1x1"))


def test_unknown_architecture_is_named(llama_copy):
    edit_config(llama_copy, architectures=["FancyNetForCausalLM"])
    with pytest.raises(ValueError, match="FancyNetForCausalLM"):
        load_model(str(llama_copy), make_mesh("1x1"))


def test_missing_config_and_tokenizer_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path), make_mesh("1x1"))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(str(tmp_path))


def test_checkpoint_reader_matches_safetensors(tiny_models):
    """Our memory-mapped reader returns what the safetensors library reads."""
    from safetensors.numpy import load_file

    path, _ = tiny_models("qwen3")
    ours = CheckpointTensors(path)
    for shard in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        for name, expected in load_file(os.path.join(path, shard)).items():
            np.testing.assert_array_equal(ours.get(name), expected)


def test_dummy_weights_have_checkpoint_shapes_and_shardings(tiny_models):
    path, _ = tiny_models("qwen2")
    real = load_model(path, make_mesh("2x4"), dtype="bfloat16")
    dummy = load_model(path, make_mesh("2x4"), dtype="bfloat16", load_format="dummy")
    real_leaves, dummy_leaves = jax.tree.leaves(real.model), jax.tree.leaves(dummy.model)
    assert len(real_leaves) == len(dummy_leaves)
    for r, d in zip(real_leaves, dummy_leaves):
        assert (r.shape, r.dtype, r.sharding) == (d.shape, d.dtype, d.sharding)
        assert np.isfinite(np.asarray(d, dtype=np.float32)).all()
    # random, not constant
    w = np.asarray(dummy.model.model.layers[0].self_attn.qkv_proj.weight[...], np.float32)
    assert w.std() > 0


def test_bad_mesh_and_load_format(tiny_models):
    path, _ = tiny_models("llama")
    with pytest.raises(ValueError, match="DATAxTENSOR"):
        make_mesh("4")
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh("2x8")
    with pytest.raises(ValueError, match="load format"):
        load_model(path, make_mesh("1x1"), load_format="pickle")


def test_weights_are_float32_on_a_cpu_unless_asked(llama_copy, caplog):
    """A bf16 checkpoint loads in float32 on a CPU (the more accurate, and the CPU has the memory); an asked-for
    bf16 is computed in float32 from weights rounded to bf16, with a bf16 KV cache, or kept in bf16 when its
    weights are to stay so; an asked-for float16 is kept, with a warning that it has no tuned CPU paths."""
    cfg_path = os.path.join(llama_copy, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    json.dump(cfg, open(cfg_path, "w"))
    loaded = load_model(llama_copy, make_mesh("1x1"))
    assert loaded.config.dtype == "float32" and loaded.kv_dtype is None
    assert {w.dtype for w in jax.tree.leaves(loaded.model)} <= {np.dtype("float32")}
    exact = jax.tree.leaves(loaded.model)

    widened = load_model(llama_copy, make_mesh("1x1"), dtype="bfloat16")
    assert widened.config.dtype == "float32" and widened.kv_dtype == "bfloat16"
    for w, x in zip(jax.tree.leaves(widened.model), exact):
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, np.asarray(x).astype(jnp.bfloat16).astype(np.float32))
    with caplog.at_level("WARNING"):
        loaded = load_model(llama_copy, make_mesh("1x1"), dtype="bfloat16", load_format="dummy",
                            cpu_bf16_weights=True)
    assert loaded.config.dtype == "bfloat16" and loaded.kv_dtype is None and "CPU" not in caplog.text
    with caplog.at_level("WARNING"):
        loaded = load_model(llama_copy, make_mesh("1x1"), dtype="float16", load_format="dummy")
    assert loaded.config.dtype == "float16" and "tuned CPU paths" in caplog.text