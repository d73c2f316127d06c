"""Greedy generation from the command line, without the serving engine:

    python -m sgjax.generate --model-path DIR --prompt "Hello" [--mesh 1x8] [--load-format dummy]
"""

from __future__ import annotations

import argparse

from sgjax.config import add_engine_arguments, mesh_from_namespace
from sgjax.executor.greedy import greedy_generate
from sgjax.models.loader import load_model, load_tokenizer
from sgjax.platform.mesh import make_mesh

# The engine's flags that plain greedy generation uses: no scheduler, KV pool sizing or sampling here.
ENGINE_FLAGS = ("model_path", "mesh", "dtype", "load_format", "page_size")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser, only=ENGINE_FLAGS)
    parser.add_argument("--prompt", action="append", help="may repeat; default: a short greeting")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    loaded = load_model(args.model_path, make_mesh(mesh_from_namespace(args)), dtype=args.dtype,
                        load_format=args.load_format)
    tokenizer = load_tokenizer(args.model_path)
    prompts = args.prompt or ["Hello, my name is"]
    ids = [tokenizer.encode(p) for p in prompts]
    for prompt, out in zip(prompts, greedy_generate(loaded, ids, args.max_new_tokens, args.page_size)):
        print(f"{prompt!r} -> {tokenizer.decode(out)!r}")


if __name__ == "__main__":
    main()
