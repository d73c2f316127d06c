"""sgjax's XLA flags (added on CUDA builds only, never overriding the user's own setting) and the
memory limit that goes with them."""

from sgjax.platform.xla_flags import with_defaults


def test_cuda_builds_get_the_command_buffer_mode():
    assert with_defaults("", cuda=True) == "--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
    assert with_defaults("--xla_force_host_platform_device_count=8", cuda=True) == (
        "--xla_force_host_platform_device_count=8 --xla_gpu_command_buffer_update_mode=SKIP_TEMP")


def test_user_setting_and_cpu_builds_are_left_alone():
    mine = "--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE"
    assert with_defaults(mine, cuda=True) == mine
    assert with_defaults("--xla_force_host_platform_device_count=8", cuda=False) == (
        "--xla_force_host_platform_device_count=8")


def test_on_by_default_on_cuda_and_off_with_the_switch():
    from sgjax.platform.xla_flags import configure

    env = {}
    configure(env, cuda=True)
    assert env["XLA_FLAGS"] == "--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
    env = {"SGJAX_XLA_SKIP_TEMP": "0", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    configure(env, cuda=True)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
    env = {}
    configure(env, cuda=False)
    assert "XLA_FLAGS" not in env


def test_pool_limit_follows_jax_memory_fraction(monkeypatch):
    """XLA's VMM allocator keeps to JAX's share of the device: the engine's limit must too."""
    from sgjax.platform.device_memory import xla_memory_limit

    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert xla_memory_limit(80_000) == 60_000
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    assert xla_memory_limit(80_000) == 40_000
