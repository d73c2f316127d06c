"""Process-wide knobs of the frontend language, as SGLang's `sgl.global_config` has them."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class GlobalConfig:
    verbosity: int = 0  # 2: print each program's text when it ends
    default_backend: object = None  # set by sgl.set_default_backend
    skip_special_tokens_in_output: bool = True  # sent with every gen
    spaces_between_special_tokens_in_out: bool = True  # sent with every gen
    # SGLang pre-fills a batch's shared prefix and encodes forks in parallel; sgjax's radix cache shares
    # prefixes by itself, so these are accepted and change nothing.
    enable_precache_with_tracing: bool = True
    enable_parallel_encoding: bool = True


global_config = GlobalConfig()
