"""The serving engine: scheduler, model runner, sampler and the Engine API."""

from sgjax.config import EngineArgs
from sgjax.engine.engine import Engine
from sgjax.engine.sampling_params import SamplingParams

__all__ = ["Engine", "EngineArgs", "SamplingParams"]
