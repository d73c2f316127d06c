"""sgjax's default XLA flags: added on CUDA builds only, never overriding the user's own setting."""

from sgjax.xla_flags import with_defaults


def test_cuda_builds_get_the_command_buffer_mode():
    assert with_defaults("", cuda=True) == "--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
    assert with_defaults("--xla_force_host_platform_device_count=8", cuda=True) == (
        "--xla_force_host_platform_device_count=8 --xla_gpu_command_buffer_update_mode=SKIP_TEMP")


def test_user_setting_and_cpu_builds_are_left_alone():
    mine = "--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE"
    assert with_defaults(mine, cuda=True) == mine
    assert with_defaults("--xla_force_host_platform_device_count=8", cuda=False) == (
        "--xla_force_host_platform_device_count=8")
