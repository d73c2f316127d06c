"""python -m sgjax.server [--model-path DIR] [--mesh 2x4] [--port 30000] [--no-engine-process] ...: the HTTP server
(without --model-path, on the bundled SmolLM2-135M-Instruct)."""

from __future__ import annotations

import logging

import jax

from sgjax.config import MultiHostArgs, args_from_cli, build_parser, from_namespace
from sgjax.config_sources import describe
from sgjax.engine import Engine
from sgjax.models.default_model import default_model_path
from sgjax.platform import distributed
from sgjax.server.app import make_app
from sgjax.server.connections import serve

# The engine schedules on one host; its steps are not yet sent to the others' devices.
NOT_ACROSS_HOSTS = ("serving one model across several hosts is not implemented yet (each host would have to run "
                    "the engine's steps in lock-step); run one server per host, or python -m sgjax.generate "
                    "across hosts")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__)
    ns = parser.parse_args(argv)
    engine_args, server_args = args_from_cli(ns)
    hosts = from_namespace(MultiHostArgs, ns)
    try:
        group = distributed.host_group(hosts.num_hosts, hosts.host_rank, hosts.coordinator)
    except ValueError as e:
        parser.error(str(e))
    if group is not None and group.num_processes is not None:
        parser.error(NOT_ACROSS_HOSTS)
    if engine_args.model_path is None:
        try:
            engine_args.model_path = default_model_path()
        except ValueError as e:
            parser.error(str(e))
    logging.basicConfig(level=server_args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sgjax.server").info("configuration: %s", describe(engine_args, server_args, hosts))
    distributed.initialize(group)  # a TPU VM's hosts, detected by JAX (--num-hosts 0)
    if group is not None and jax.process_count() > 1:
        parser.error(f"{jax.process_count()} hosts found: {NOT_ACROSS_HOSTS}")
    engine = Engine(args=engine_args, engine_process=server_args.engine_process,
                    restart_engine=server_args.restart_engine)
    try:
        serve(make_app(engine, server_args), server_args)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
