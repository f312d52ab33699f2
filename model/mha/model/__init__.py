"""PyTorch multi-head attention: the module, its reference path, and weight loaders."""

from mha.model.attention import MultiHeadAttention
from mha.model.bert import from_bert
from mha.model.config import AttentionConfig
from mha.model.default import DEFAULT_SEED, default_model, seeded_model
from mha.model.hf import HFBlock, from_hf
from mha.model.hf_layers import LayerChoice
from mha.model.kv_cache import KVCache
from mha.model.reference import reference_attention
from mha.model.weights import WeightsError, from_torch, load, save, state_sha256

__all__ = [
    "DEFAULT_SEED",
    "AttentionConfig",
    "HFBlock",
    "KVCache",
    "LayerChoice",
    "MultiHeadAttention",
    "WeightsError",
    "default_model",
    "from_bert",
    "from_hf",
    "from_torch",
    "load",
    "reference_attention",
    "save",
    "seeded_model",
    "state_sha256",
]
