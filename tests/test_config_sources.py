"""Flags from SGJAX_<FLAG> environment variables and --config YAML files: flags > environment > file >
defaults, each value converted as its flag would be, and a bad one named by where it came from."""

import argparse

import pytest

from sgjax.config import EngineArgs, ServerArgs, add_arguments, add_engine_arguments, args_from_cli, build_parser
from sgjax.config_sources import ConfigError, describe, env_name


def parse(argv: list[str]) -> tuple[EngineArgs, ServerArgs]:
    return args_from_cli(build_parser().parse_args(argv))


def write(tmp_path, text: str) -> str:
    path = tmp_path / "sgjax.yaml"
    path.write_text(text)
    return str(path)


def test_every_flag_has_its_variable_and_the_flag_wins(monkeypatch):
    monkeypatch.setenv("SGJAX_MODEL_PATH", "/models/x")
    monkeypatch.setenv("SGJAX_MESH", "2x4")
    monkeypatch.setenv("SGJAX_PORT", "8080")
    monkeypatch.setenv("SGJAX_MEM_FRACTION_STATIC", "0.5")
    monkeypatch.setenv("SGJAX_API_KEY", "secret")
    monkeypatch.setenv("SGJAX_SCHEDULE_POLICY", "fcfs")
    engine, server = parse([])
    assert (engine.model_path, engine.mesh, engine.mem_fraction_static, engine.schedule_policy) == \
        ("/models/x", "2x4", 0.5, "fcfs")
    assert (server.port, server.api_key) == (8080, "secret")
    engine, server = parse(["--port", "9000", "--mesh", "1x2", "--api-key", "other"])
    assert (engine.mesh, server.port, server.api_key) == ("1x2", 9000, "other")
    assert env_name("max_running_requests") == "SGJAX_MAX_RUNNING_REQUESTS"


@pytest.mark.parametrize("word, on", [("1", True), ("true", True), ("YES", True), ("on", True),
                                      ("0", False), ("false", False), ("No", False), ("off", False)])
def test_switches_read_true_and_false_words(monkeypatch, word, on):
    monkeypatch.setenv("SGJAX_ENGINE_PROCESS", word)  # defaults to on
    monkeypatch.setenv("SGJAX_DISABLE_RADIX_CACHE", word)  # defaults to off
    engine, server = parse([])
    assert server.engine_process is on and engine.disable_radix_cache is on
    # the command line still turns either way, whatever the environment said
    engine, server = parse(["--no-engine-process", "--no-disable-radix-cache"] if on else
                           ["--engine-process", "--disable-radix-cache"])
    assert server.engine_process is (not on) and engine.disable_radix_cache is (not on)


@pytest.mark.parametrize("name, value, expected", [
    ("SGJAX_PORT", "80a", "SGJAX_PORT='80a': expected int"),
    ("SGJAX_MEM_FRACTION_STATIC", "half", "SGJAX_MEM_FRACTION_STATIC='half': expected float"),
    ("SGJAX_ENGINE_PROCESS", "maybe", "SGJAX_ENGINE_PROCESS='maybe': expected true or false"),
    ("SGJAX_DTYPE", "int8", "SGJAX_DTYPE='int8': expected one of float32, bfloat16, float16"),
])
def test_a_bad_value_names_its_variable(monkeypatch, capsys, name, value, expected):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit):
        build_parser()
    assert expected in capsys.readouterr().err
    cls = ServerArgs if name in ("SGJAX_PORT", "SGJAX_ENGINE_PROCESS") else EngineArgs
    with pytest.raises(ConfigError, match=name):  # any command line built from the fields
        add_arguments(argparse.ArgumentParser(), cls)


def test_other_command_lines_get_the_environment_too(monkeypatch):
    monkeypatch.setenv("SGJAX_MAX_RUNNING_REQUESTS", "7")
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser, only=("max_running_requests",), defaults={"max_running_requests": 1024})
    assert parser.parse_args([]).max_running_requests == 7  # over a script's own default
    assert parser.parse_args(["--max-running-requests", "3"]).max_running_requests == 3


def test_a_config_file_sits_under_flags_and_environment(monkeypatch, tmp_path):
    path = write(tmp_path, "model-path: /models/y\nport: 8001\nmax_running_requests: 8\n"
                           "disable_radix_cache: true\nengine_process: false\ndtype: bfloat16\n")
    monkeypatch.setenv("SGJAX_MAX_RUNNING_REQUESTS", "16")
    engine, server = parse(["--config", path])
    assert (engine.model_path, server.port, engine.max_running_requests, engine.dtype) == \
        ("/models/y", 8001, 16, "bfloat16")
    assert engine.disable_radix_cache and not server.engine_process
    # flags win wherever they stand on the command line
    engine, server = parse(["--port", "1", "--config", path, "--dtype", "float32"])
    assert (server.port, engine.dtype, engine.model_path) == (1, "float32", "/models/y")


def test_sgjax_config_names_the_file_and_the_flag_replaces_it(monkeypatch, tmp_path):
    monkeypatch.setenv("SGJAX_CONFIG", write(tmp_path, "port: 8002\npage_size: 8\n"))
    engine, server = parse([])
    assert (server.port, engine.page_size) == (8002, 8)
    other = tmp_path / "other.yaml"
    other.write_text("port: 8003\n")
    engine, server = parse(["--config", str(other)])
    assert (server.port, engine.page_size) == (8003, 8)


@pytest.mark.parametrize("text, expected", [
    ("prot: 8000\n", "unknown option prot"),
    ("port: eighty\n", "port='eighty': expected int"),
    ("page_size: 1.5\n", "page_size=1.5: expected int"),
    ("log_requests: 3\n", "log_requests=3: expected true or false"),
    ("- port\n", "must be a mapping"),
    ("port: [1\n", "not valid YAML"),
])
def test_a_bad_config_file_is_an_error_naming_it(tmp_path, capsys, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--config", path])
    err = capsys.readouterr().err
    assert expected in err and path in err


def test_a_file_shared_with_the_server_serves_a_smaller_command_line(tmp_path):
    """generate-like CLIs offer a subset; the server's options in the same file are not errors there."""
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser, only=("page_size",))
    ns = parser.parse_args(["--config", write(tmp_path, "page_size: 32\nport: 8000\napi_key: k\n")])
    assert ns.page_size == 32 and not hasattr(ns, "port")


def test_the_logged_configuration_masks_secrets():
    line = describe(EngineArgs(model_path="/m"), ServerArgs(api_key="sk-123"))
    assert "api_key=*** " in line and "sk-123" not in line
    assert "model_path='/m'" in line and "port=30000" in line
    assert "api_key=None" in describe(ServerArgs())
