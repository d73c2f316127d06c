"""The serving engine: the Engine API, its scheduler loop (core), requests, output processing and stats."""

from sgjax.config import EngineArgs
from sgjax.engine.engine import Engine
from sgjax.engine.outputs import RequestOutput
from sgjax.engine.sampling_params import SamplingParams

__all__ = ["Engine", "EngineArgs", "RequestOutput", "SamplingParams"]
