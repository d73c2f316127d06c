"""python -m sgjax.server [--model-path DIR] [--mesh 2x4] [--port 30000] [--no-engine-process] ...: the HTTP server
(without --model-path, on the bundled SmolLM2-135M-Instruct)."""

from __future__ import annotations

import logging

from aiohttp import web

from sgjax.config import args_from_cli, build_parser
from sgjax.config_sources import describe
from sgjax.engine import Engine
from sgjax.models.default_model import default_model_path
from sgjax.server.app import make_app


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__)
    engine_args, server_args = args_from_cli(parser.parse_args(argv))
    if engine_args.model_path is None:
        try:
            engine_args.model_path = default_model_path()
        except ValueError as e:
            parser.error(str(e))
    logging.basicConfig(level=server_args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sgjax.server").info("configuration: %s", describe(engine_args, server_args))
    engine = Engine(args=engine_args, engine_process=server_args.engine_process)
    try:
        web.run_app(make_app(engine, server_args), host=server_args.host, port=server_args.port,
                    access_log=None, print=lambda msg: logging.getLogger("sgjax.server").info(msg))
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
