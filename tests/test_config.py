"""The command lines are built from the EngineArgs / ServerArgs fields, so each default is written once."""

import argparse
import dataclasses
import pytest

from sgjax.config import (EngineArgs, ServerArgs, add_arguments, add_engine_arguments, args_from_cli, build_parser,
                          engine_args_from_namespace, field_default, from_namespace, resolve_context_length)


def flags_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("cls", [EngineArgs, ServerArgs])
def test_every_field_has_a_flag_with_help(cls):
    flags = flags_of(build_parser())
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        assert flag in flags, flag
        assert flags[flag].help and f.metadata["help"], flag


def test_no_arguments_give_the_dataclass_defaults():
    engine, server = args_from_cli(build_parser().parse_args(["--model-path", "m"]))
    assert engine == EngineArgs(model_path="m")
    assert server == ServerArgs()


def test_the_server_keeps_its_flags_and_spellings():
    flags = flags_of(build_parser())
    for flag in ("--tp", "--tp-size", "--dp", "--dp-size", "--engine-process", "--no-engine-process",
                 "--disable-radix-cache", "--kv-cache-dtype", "--schedule-policy", "--api-key"):
        assert flag in flags, flag
    # optional: without it the server runs the bundled default model
    assert not flags["--model-path"].required and flags["--model-path"].default is None
    assert flags["--schedule-policy"].choices == ("lpm", "fcfs", "lof")
    assert flags["--dtype"].choices == ("float32", "bfloat16", "float16")


def test_switches_and_optional_ints_parse():
    ns = build_parser().parse_args(["--model-path", "m", "--disable-radix-cache", "--no-engine-process",
                                    "--context-length", "4096", "--num-pages", "100", "--mem-fraction-static", "0.5"])
    engine, server = args_from_cli(ns)
    assert engine.disable_radix_cache and not server.engine_process
    assert (engine.context_length, engine.num_pages, engine.mem_fraction_static) == (4096, 100, 0.5)


@pytest.mark.parametrize("argv, mesh", [(["--tp", "4", "--dp", "2"], "2x4"), (["--tp-size", "8"], "1x8"),
                                        (["--dp-size", "2"], "2x1"), (["--mesh", "2x2"], "2x2"), ([], "1x1")])
def test_tp_and_dp_set_the_mesh(argv, mesh):
    assert args_from_cli(build_parser().parse_args(["--model-path", "m", *argv]))[0].mesh == mesh


def test_a_script_overrides_defaults_and_picks_a_subset():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser, only=("max_running_requests", "schedule_policy", "disable_overlap_schedule"),
                         defaults={"max_running_requests": 1024})
    assert set(flags_of(parser)) == {"-h", "--help", "--max-running-requests", "--schedule-policy",
                                     "--disable-overlap-schedule", "--config"}
    args = engine_args_from_namespace(parser.parse_args([]), model_path="folder", load_format="dummy")
    assert args == EngineArgs(model_path="folder", load_format="dummy", max_running_requests=1024)
    args = engine_args_from_namespace(parser.parse_args(["--max-running-requests", "8", "--schedule-policy", "lof"]),
                                      model_path="folder")
    assert (args.max_running_requests, args.schedule_policy, args.mesh) == (8, "lof", "1x1")


def test_a_default_true_switch_and_a_renamed_flag():
    parser = argparse.ArgumentParser()
    add_arguments(parser, EngineArgs, only=("disable_radix_cache", "schedule_policy"),
                  defaults={"disable_radix_cache": True}, names={"schedule_policy": "policy"})
    ns = parser.parse_args(["--no-disable-radix-cache", "--policy", "fcfs"])
    assert ns.policy == "fcfs" and not ns.disable_radix_cache
    args = from_namespace(EngineArgs, ns, names={"schedule_policy": "policy"}, model_path="m")
    assert args.schedule_policy == "fcfs"


def test_exclude_leaves_the_field_to_the_script():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser, exclude=("model_path", "load_format", "mesh"))
    assert "--model-path" not in flags_of(parser) and "--tp" not in flags_of(parser)
    args = engine_args_from_namespace(parser.parse_args([]), model_path="folder")
    assert args == EngineArgs(model_path="folder")


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match="no field"):
        add_engine_arguments(argparse.ArgumentParser(), only=("max_running_request",))
    with pytest.raises(ValueError, match="not offered"):
        add_engine_arguments(argparse.ArgumentParser(), only=("mesh",), defaults={"page_size": 8})
    with pytest.raises(TypeError, match="no field"):
        from_namespace(EngineArgs, argparse.Namespace(), model_path="m", page_sise=8)


def test_validation_still_raises():
    parser = build_parser()
    with pytest.raises(SystemExit):  # a choice argparse checks
        parser.parse_args(["--model-path", "m", "--schedule-policy", "random"])
    with pytest.raises(ValueError, match="schedule_policy"):
        EngineArgs(model_path="m", schedule_policy="random")
    with pytest.raises(ValueError, match="max_running_requests"):
        args_from_cli(parser.parse_args(["--model-path", "m", "--max-running-requests", "0"]))
    with pytest.raises(ValueError, match="mem_fraction_static"):
        args_from_cli(parser.parse_args(["--model-path", "m", "--mem-fraction-static", "1.5"]))
    with pytest.raises(ValueError, match="max_connections must be positive"):
        args_from_cli(parser.parse_args(["--model-path", "m", "--max-connections", "0"]))


def test_the_compilation_cache_default_is_the_factorys():
    f = next(f for f in dataclasses.fields(EngineArgs) if f.name == "compilation_cache_dir")
    assert build_parser().parse_args(["--model-path", "m"]).compilation_cache_dir == field_default(f)


def test_context_length_is_the_asked_one_else_the_models():
    assert resolve_context_length(None, 8192) == 8192
    assert resolve_context_length(2048, 8192) == 2048
    assert resolve_context_length(16384, 8192) == 16384  # not capped: RoPE scaling may serve beyond the config
    with pytest.raises(ValueError):
        resolve_context_length(-1, 8192)


def test_generate_takes_its_flags_from_engine_args(capsys):
    from sgjax.generate.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--model-path", "--mesh", "--dtype", "--load-format", "--page-size", "--prompt",
                 "--max-new-tokens"):
        assert flag in out
    assert "tokens per KV page (default: 16)" in out
