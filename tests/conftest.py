"""Shared fixtures. Eight simulated CPU devices for every test, so sharded runs need no separate job."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from sgjax.testing.tiny_models import FAMILIES, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> (checkpoint folder, the transformers model it was saved from)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            path = str(tmp_path_factory.mktemp(f"tiny-{family}"))
            cache[family] = (path, make_tiny_model(path, family))
        return cache[family]

    return get


ALL_FAMILIES = sorted(FAMILIES)
