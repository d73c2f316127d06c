"""A host other than host 0 when one engine spans several hosts: it runs host 0's steps on its own devices.

Requests reach host 0 only, and its engine alone schedules; every host's devices must still run each of its
programs (JAX runs a program over the whole mesh, every host enqueueing it). So this host builds the same
runner (model_setup.py, with host 0's pool size) and replays the device calls host 0's runner sends over the
step channel (step_channel.py), in their order. It keeps no scheduler, cache or requests: their state lives in
the device calls' inputs. It never reads a result back.
"""

from __future__ import annotations

import logging

import jax

from sgjax.config import EngineArgs, resolve_context_length
from sgjax.engine import model_setup
from sgjax.engine.step_channel import STOP, Hello, StepReceiver, check_same_flags
from sgjax.executor.device_calls import Replayer

logger = logging.getLogger(__name__)


def follow(args: EngineArgs) -> None:
    """Run host 0's steps until host 0 stops. Raises EOFError if host 0 vanished without stopping."""
    loaded = model_setup.load(args)
    channel = StepReceiver.connect()
    try:
        hello = channel.receive()
        if not isinstance(hello, Hello):
            raise TypeError(f"host 0 sent {type(hello).__name__} before its Hello")
        check_same_flags(args, hello.args)
        context_length = resolve_context_length(args.context_length, loaded.config.max_position_embeddings)
        replay = Replayer(model_setup.make_runner(args, loaded, hello.num_pages, context_length))
        logger.info("host %d of %d: running host 0's steps", jax.process_index(), jax.process_count())
        while (call := channel.receive()) != STOP:
            replay(call)
        logger.info("host 0 stopped after %d device calls", replay.num_calls)
    finally:
        channel.close()
