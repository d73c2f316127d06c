"""sgjax: an LLM serving engine on JAX/XLA, and its frontend language (`import sgjax as sgl`)."""

__version__ = "0.1.0"

from sgjax.platform.xla_flags import configure as _configure_xla  # noqa: E402

_configure_xla()  # before JAX starts a GPU backend (xla_flags.py; SGJAX_XLA_SKIP_TEMP=0 turns it off)

from sgjax.lang import *  # noqa: E402,F401,F403
from sgjax.lang import __all__  # noqa: E402,F401
