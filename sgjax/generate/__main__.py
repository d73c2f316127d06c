"""Greedy generation from the command line, without the serving engine:

    python -m sgjax.generate --chat "What is the capital of France?"      # the bundled SmolLM2-135M-Instruct
    python -m sgjax.generate --model-path DIR --prompt "Hello" [--mesh 1x8] [--load-format dummy]
    # the same on each of 2 hosts, the mesh over both hosts' devices; host 0 prints
    python -m sgjax.generate --mesh 2x4 --num-hosts 2 --host-rank I --coordinator HOST0:8476 ...
"""

from __future__ import annotations

import argparse

import jax

from sgjax import kernels
from sgjax.config import MultiHostArgs, add_arguments, add_engine_arguments, from_namespace, mesh_from_namespace
from sgjax.engine.text_side import load_text_side
from sgjax.executor.greedy import greedy_generate
from sgjax.models.default_model import default_model_path
from sgjax.models.loader import load_model
from sgjax.platform import distributed
from sgjax.platform.compile_cache import enable_compile_cache
from sgjax.platform.mesh import make_mesh

# The engine's flags that plain greedy generation uses: no scheduler, KV pool sizing or sampling here.
ENGINE_FLAGS = ("model_path", "mesh", "dtype", "load_format", "page_size", "compilation_cache_dir")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser, only=ENGINE_FLAGS)
    add_arguments(parser.add_argument_group("multi-host"), MultiHostArgs)
    parser.add_argument("--prompt", action="append", help="text to continue; may repeat")
    parser.add_argument("--chat", action="append",
                        help="a user message, answered through the model's chat template; may repeat")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    hosts = from_namespace(MultiHostArgs, args)
    try:
        distributed.initialize(distributed.host_group(hosts.num_hosts, hosts.host_rank, hosts.coordinator))
    except ValueError as e:
        parser.error(str(e))
    if args.model_path is None:
        try:
            args.model_path = default_model_path()
        except ValueError as e:
            parser.error(str(e))

    enable_compile_cache(args.compilation_cache_dir)
    loaded = load_model(args.model_path, make_mesh(mesh_from_namespace(args)), dtype=args.dtype,
                        load_format=args.load_format, kernels=kernels.select("pallas", args.page_size))
    tokenizer, eos_token_ids, _ = load_text_side(args.model_path, args.load_format, loaded.config.vocab_size)
    if tokenizer is None:
        parser.error(f"{args.model_path} has no tokenizer")
    prompts = [(p, tokenizer.encode(p)) for p in args.prompt or []]
    for message in args.chat or []:
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                             tokenize=False)
        prompts.append((message, tokenizer.encode(text, add_special_tokens=False)))
    if not prompts:
        prompts = [(p, tokenizer.encode(p)) for p in ["Hello, my name is"]]
    outputs = greedy_generate(loaded, [ids for _, ids in prompts], args.max_new_tokens, args.page_size)
    if jax.process_index() != 0:
        return  # every host computed the same tokens
    for (prompt, _), out in zip(prompts, outputs):
        # Greedy generation runs a fixed number of steps; the answer ends at the first end-of-sequence token.
        end = next((i for i, token in enumerate(out) if token in eos_token_ids), len(out))
        print(f"{prompt!r} -> {tokenizer.decode(out[:end], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
