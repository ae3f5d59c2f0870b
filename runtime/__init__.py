"""flashtier.runtime: the engine. Public API: :func:`open_model`, :class:`Model`, configs."""

from flashtier.runtime.engine import EngineConfig, GenerationResult, Model, TokenEvent, open_model, parse_bytes
from flashtier.runtime.sampling import SamplingConfig

__all__ = ["EngineConfig", "GenerationResult", "Model", "SamplingConfig", "TokenEvent", "open_model", "parse_bytes"]
