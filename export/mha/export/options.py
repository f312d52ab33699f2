"""Export settings in one place: targets, opsets, tolerances, dynamic axes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mha import contract


@dataclass(frozen=True)
class Target:
    """One export target: the attention node it emits and the opset it needs."""

    name: str
    node: str  # "domain.OpType" of the fused node; "" for the decomposed target
    opset: int
    keeps_fused_weights: bool  # the fused node itself produces attention weights
    description: str


TARGETS: dict[str, Target] = {
    "onnx": Target(
        "onnx",
        "Attention",
        23,
        True,  # qk_matmul_output_mode=3 returns softmax(QK^T/sqrt(d)) from the node itself
        "ONNX Attention (opset 23): any runtime with opset 23",
    ),
    "ort": Target(
        "ort",
        "com.microsoft.MultiHeadAttention",
        18,
        False,  # its `qk` output is pre-softmax: weights need one Softmax on that output
        "com.microsoft.MultiHeadAttention: ONNX Runtime only, fastest on CPU and CUDA",
    ),
    "none": Target("none", "", 18, False, "decomposed MatMul/Softmax (opset 18): any runtime"),
}

DTYPES = ("fp32", "fp16")

# How a KV-cache step graph's fused node gets the past keys and the mask, per (target, dtype):
# "concat" = concat(past, new) as 3D key/value with an explicit causal + padding mask;
# "concat-fp32" = the same with the node computing in fp32. Measured on 2 CPU cores,
# onnxruntime 1.32, d_model 512, 8 heads, step latency at B=1 T=1 P=1024: feeding the nodes'
# own past_key/past_value inputs instead was no faster for MultiHeadAttention (0.19-0.21 vs
# 0.20-0.22 ms fp32) and slower for Attention in fp32 (0.20 vs 0.12-0.14 ms). Attention's
# fp16 kernel misses the fp16 parity bound on some decodes (1.02x); computing in fp32 it
# holds (0.5x) and is no slower (0.18 ms vs 0.21 with past inputs, 0.47 fp16 concat).
# GroupQueryAttention refuses multi-token steps of B > 1 with a past.
STEP_FEEDS = {
    ("ort", "fp32"): "concat",
    ("ort", "fp16"): "concat",
    ("onnx", "fp32"): "concat",
    ("onnx", "fp16"): "concat-fp32",
    ("none", "fp32"): "concat",  # decomposed: the model's own concat and mask
    ("none", "fp16"): "concat",
}

# Per dtype: |onnx - eager| <= atol + rtol * |eager|, elementwise.
# fp32: ORT and torch differ by accumulation order only, ~1e-6 on these sizes; 1e-5 leaves
# room for long sequences without hiding a wrong mask (that shows up as ~1e-1).
# fp16: compared with fp32 eager on the same (fp16-valued) weights and inputs. atol 1e-3
# alone is unreachable for |values| >= 2: fp16 spacing there is 2^-9 ~ 0.002, so merely
# storing the answer in fp16 can move it by 0.001. rtol = 2^-10 (one fp16 ulp, relative)
# admits exactly that representation error and nothing more. The figures live in the
# tensor contract, which `mha infer --compare` reads too.
TOLERANCE = {dtype: contract.PARITY_TOLERANCE[dtype.upper()][0] for dtype in ("fp32", "fp16")}
RTOL = {dtype: contract.PARITY_TOLERANCE[dtype.upper()][1] for dtype in ("fp32", "fp16")}


def unsupported(target: str, dtype: str, causal: bool, attention_weights: bool) -> str:
    """Why a combination cannot pass its own parity, or "" (measured on ORT 1.32 CPU)."""
    if (target, dtype) == ("onnx", "fp16") and causal and attention_weights:
        return (
            "--attention-op onnx --dtype fp16 --causal --attention-weights misses its own fp16 "
            "parity (1.04x the bound at the default size): when the Attention node's weights "
            "output is used, ONNX Runtime's CPU runs the node in fp16 arithmetic (in fp32 "
            "otherwise). Use --attention-op ort (MultiHeadAttention, weights from its qk "
            "output), --dtype fp32, or leave out --attention-weights"
        )
    return ""


# Sizes of the example inputs that the graph is traced with. Parity is checked on other
# shapes (validate.py), so a graph that specialised to these would fail there.
EXPORT_SHAPE = {"B": 2, "L": 5, "S": 7}
# The same for a KV-cache step graph: B sequences, T new tokens, P past ones, C = P + T slots.
STEP_EXPORT_SHAPE = {"B": 2, "T": 3, "P": 5, "C": 8}
# The same for a memory export: B sequences, T new tokens, a memory of S.
MEMORY_EXPORT_SHAPE = {"B": 2, "T": 3, "S": 7}

# Initializers above this size go to `model.onnx.data` (protobuf caps a file at 2 GiB).
EXTERNAL_DATA_BYTES = 256 << 20


@dataclass(frozen=True)
class ExportOptions:
    """What to export and where. Weights: embedded default unless a source is given."""

    repository: Path = Path("models")
    name: str = "mha"
    version: int = 1
    target: str = "ort"
    dtype: str = "fp32"
    self_attention: bool = True
    causal: bool = False
    attention_weights: bool = False
    # Weight sources (at most one): our safetensors, a BERT-style checkpoint, a Hugging
    # Face checkpoint folder, or seeded.
    weights: Path | None = None
    bert: Path | None = None
    bert_layer: int = 0
    # With hf: sizes, heads, biases and causality come from its config.json, and
    # self_attention is hf_attention == "self" (causal is settled when the layer is read:
    # mha.export.sources.resolve_source). hf_stack None: the decoder, if the model has one.
    hf: Path | None = None
    hf_layer: int = 0
    hf_attention: str = "self"
    hf_stack: str | None = None
    d_model: int = 512
    num_heads: int | None = 8  # None with a BERT checkpoint: from its config.json
    kdim: int | None = None
    vdim: int | None = None
    bias: bool = True
    seed: int = 0
    max_batch_size: int = 64
    # with kv_cache: the longest context (P + T) served; with kv_cache and cross: the
    # longest memory (S)
    max_sequence_length: int = 4096
    # The decoding step graph of causal self-attention (mha.contract.step_inputs) instead of
    # the full-sequence graph; implies causal=True. With self_attention=False: the memory
    # projection and the step graph of cross-attention (mha.contract.memory_step_inputs).
    kv_cache: bool = False
    external_data: bool | None = None  # None = by size
    extra_metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose from {', '.join(TARGETS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        given = [n for n in ("weights", "bert", "hf") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(
                f"give at most one weights source, got {' and '.join('--' + n for n in given)}"
            )
        if self.hf is not None:
            self.check_hf()
        if self.kv_cache:
            self.check_kv_cache()
        if self.causal and not self.self_attention:
            raise ValueError("causal=True is defined for self-attention only (use --self)")
        refusal = unsupported(self.target, self.dtype, self.causal, self.attention_weights)
        if refusal:
            raise ValueError(refusal)
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"model name {self.name!r} must be a plain folder name")
        if self.num_heads is None and self.bert is None and self.hf is None:
            raise ValueError("num_heads is required unless a checkpoint gives it")
        if self.version < 1:
            raise ValueError(f"version must be >= 1, got {self.version}")
        if self.max_batch_size < 1 or self.max_sequence_length < 1:
            raise ValueError(
                f"max_batch_size={self.max_batch_size} and max_sequence_length="
                f"{self.max_sequence_length} must be >= 1"
            )

    def check_hf(self) -> None:
        """Refuse a layer choice that cannot be; take self/cross from hf_attention."""
        if self.hf_attention not in ("self", "cross"):
            raise ValueError(f"hf_attention {self.hf_attention!r} must be 'self' or 'cross'")
        if self.hf_stack not in (None, "encoder", "decoder"):
            raise ValueError(f"hf_stack {self.hf_stack!r} must be 'encoder' or 'decoder'")
        if self.hf_layer < 0:
            raise ValueError(f"hf_layer must be >= 0, got {self.hf_layer}")
        object.__setattr__(self, "self_attention", self.hf_attention == "self")  # frozen

    def check_kv_cache(self) -> None:
        """Refuse what a step graph cannot be; set causal for self-attention decoding.

        With --cross the export is a cross-attention memory model (not causal): memory.onnx
        projects the memory once, model.onnx is the step over it (mha.contract.MEMORY_KIND).
        """
        if self.attention_weights:
            raise ValueError(
                "--kv-cache step graphs have no attention_weights output: drop --attention-weights"
            )
        if not self.self_attention:
            if self.causal:
                raise ValueError("--cross --kv-cache attends a memory: it cannot be --causal")
            return
        object.__setattr__(self, "causal", True)  # frozen: set once, before anyone reads it

    @property
    def memory(self) -> bool:
        """A cross-attention memory export: memory.onnx and the step graph over its output."""
        return self.kv_cache and not self.self_attention

    @property
    def step_feed(self) -> str:
        """How this export's step graph feeds its fused node (STEP_FEEDS)."""
        return STEP_FEEDS[(self.target, self.dtype)]

    @property
    def model_dir(self) -> Path:
        """<repo>/<name>/<version>."""
        return self.repository / self.name / str(self.version)
