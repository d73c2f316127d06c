"""python -m sgjax.server [--model-path DIR] [--mesh 2x4] [--port 30000] [--no-engine-process] ...: the HTTP server
(without --model-path, on the bundled SmolLM2-135M-Instruct).

One model over several hosts: the same command on every host, with --num-hosts N --host-rank I --coordinator
HOST0:PORT (or --num-hosts 0 where JAX detects them); host 0 serves HTTP and schedules, the others run its
steps on their devices (sgjax/engine/follower.py)."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import NoReturn

import jax

from sgjax.config import EngineArgs, MultiHostArgs, ServerArgs, args_from_cli, build_parser, from_namespace
from sgjax.config_sources import describe
from sgjax.engine import Engine
from sgjax.engine.follower import follow
from sgjax.engine.messages import StartupPhase
from sgjax.models.default_model import default_model_path, model_name
from sgjax.platform import distributed
from sgjax.server.app import make_app
from sgjax.server.connections import serve
from sgjax.server.startup import Serving

logger = logging.getLogger("sgjax.server")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__)
    ns = parser.parse_args(argv)
    engine_args, server_args = args_from_cli(ns)
    hosts = from_namespace(MultiHostArgs, ns)
    try:
        group = distributed.host_group(hosts.num_hosts, hosts.host_rank, hosts.coordinator)
    except ValueError as e:
        parser.error(str(e))
    if engine_args.model_path is None:
        try:
            engine_args.model_path = default_model_path()
        except ValueError as e:
            parser.error(str(e))
    logging.basicConfig(level=server_args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("configuration: %s", describe(engine_args, server_args, hosts))
    distributed.initialize(group)  # before any other use of the devices; JAX may detect the hosts (--num-hosts 0)
    # Asked only of several hosts: it starts JAX's backend in this process, which the engine process then could
    # not use (a TPU opens in one process only)
    if group is None or jax.process_count() == 1:
        _serve_while_starting(engine_args, server_args)
        return
    if jax.process_index() != 0:
        _follow(engine_args)
        return
    # The process that joined the hosts runs the model; on host 0 that is this one, beside the HTTP server.
    # Built before the port opens: its failure must end this process through _exit_now, not through a serving
    # loop and JAX's exit, which would wait for the other hosts.
    logger.info("host 0 of %d: serving HTTP; the engine runs in this process", jax.process_count())
    try:
        engine = Engine(args=engine_args)
    except BaseException:
        _exit_now("host 0's engine failed to start")
    try:
        serve(make_app(engine, server_args), server_args)
    finally:
        engine.shutdown()


def _serve_while_starting(engine_args: EngineArgs, server_args: ServerArgs) -> None:
    """Open the port at once and build the Engine meanwhile (/health reports its progress); an engine that
    fails to start ends the server with its exception."""
    serving = Serving(model_name(engine_args.model_path))

    def build(report: Callable[[StartupPhase], None]) -> Engine:
        return Engine(args=engine_args, engine_process=server_args.engine_process,
                      restart_engine=server_args.restart_engine, on_phase=report)

    try:
        serve(make_app(serving, server_args), server_args, starting=functools.partial(serving.start, build))
    finally:
        serving.shutdown()


def _follow(engine_args: EngineArgs) -> None:
    """A host of rank > 0: run host 0's steps until it stops; exit 1 on anything else."""
    try:
        follow(engine_args)
    except BaseException:
        _exit_now(f"host {jax.process_index()} stops")


def _exit_now(message: str) -> NoReturn:
    """Log the exception being handled and exit with 1, not through JAX's exit, whose shutdown waits for every
    host: the others, which stop on this one's failure, would never come."""
    logger.exception(message)
    logging.shutdown()
    os._exit(1)


if __name__ == "__main__":
    main()
