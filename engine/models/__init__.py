"""Model definitions (our own, not wrapped transformers modules) and checkpoint loading."""
from .config import ModelConfig, SUPPORTED_ARCHITECTURES, load_model_config
from .decoder import DecoderLM
from .loader import load_model

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES", "load_model_config", "DecoderLM", "load_model"]
