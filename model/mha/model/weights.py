"""Real weights in and out: torch.nn.MultiheadAttention, BERT-style safetensors, our own files.

Nothing is ever unpickled: checkpoints are read with safetensors only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from mha.model.attention import MultiHeadAttention
from mha.model.config import AttentionConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
CONFIG_KEY = "mha.config"


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded: missing, unreadable, or wrongly shaped tensors."""


def load_state(module: MultiHeadAttention, tensors: Mapping[str, Tensor], source: str) -> None:
    """Copy `{proj}.weight/bias` tensors into module, checking names and shapes first."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise WeightsError(f"{source}: missing tensors {', '.join(missing)}")
    for name, target in expected.items():
        got = tuple(tensors[name].shape)
        if got != tuple(target.shape):
            raise WeightsError(
                f"{source}: tensor {name} has shape {got}, expected {tuple(target.shape)}"
            )
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name].to(target.dtype))


def from_torch(mha: nn.MultiheadAttention) -> MultiHeadAttention:
    """Build our module with the weights of a torch.nn.MultiheadAttention."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise WeightsError("nn.MultiheadAttention with add_bias_kv/add_zero_attn is not supported")
    if mha.dropout:
        raise WeightsError(f"nn.MultiheadAttention dropout={mha.dropout}: inference needs 0.0")
    has_bias = mha.in_proj_bias is not None
    config = AttentionConfig(mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim, bias=has_bias)
    if mha.in_proj_weight is not None:  # packed (E, E) projections, (3E, E)
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:  # separate projections when kdim/vdim differ from embed_dim
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    tensors = {"q_proj.weight": wq, "k_proj.weight": wk, "v_proj.weight": wv}
    tensors["out_proj.weight"] = mha.out_proj.weight
    if has_bias:
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        tensors |= {"q_proj.bias": bq, "k_proj.bias": bk, "v_proj.bias": bv}
        tensors["out_proj.bias"] = mha.out_proj.bias
    module = MultiHeadAttention(config)
    load_state(module, {k: t.detach() for k, t in tensors.items()}, "nn.MultiheadAttention")
    return module


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file (no pickle)."""
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except WeightsError:
        raise
    except Exception as err:  # safetensors raises several types for a corrupt header
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from err


def save(module: MultiHeadAttention, path: Path) -> None:
    """Write the module's weights and config to one safetensors file."""
    tensors = {k: t.detach().contiguous() for k, t in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={CONFIG_KEY: json.dumps(config_dict(module.config))})


def load(path: Path) -> MultiHeadAttention:
    """Read a module written by `save`."""
    tensors, metadata = read_safetensors(path)
    if CONFIG_KEY not in metadata:
        raise WeightsError(f"{path}: no {CONFIG_KEY} metadata; not written by mha (try --bert)")
    try:
        config = AttentionConfig(**json.loads(metadata[CONFIG_KEY]))
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{path}: bad {CONFIG_KEY} metadata: {err}") from err
    module = MultiHeadAttention(config)
    load_state(module, tensors, str(path))
    return module


def config_dict(config: AttentionConfig) -> dict[str, object]:
    """The config as JSON-ready fields."""
    return {
        "d_model": config.d_model,
        "num_heads": config.num_heads,
        "kdim": config.kdim,
        "vdim": config.vdim,
        "bias": config.bias,
        "causal": config.causal,
    }


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_sha256(module: nn.Module) -> str:
    """sha256 over the module's tensors (names, shapes, fp32 bytes), independent of files."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
