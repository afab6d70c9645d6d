"""The native Llama-family engine: config, decoder, checkpoint loading, and the Engine that binds the plugins."""

from ollm_triton.engine.checkpoint import CheckpointError
from ollm_triton.engine.config import SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedModelError
from ollm_triton.engine.engine import Engine, load_engine
from ollm_triton.engine.tokenizer import Tokenizer

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "Engine",
    "ModelConfig",
    "Tokenizer",
    "UnsupportedModelError",
    "load_engine",
]
