"""Post-export graph work: blank unused outputs, count fused nodes, metadata."""

from __future__ import annotations

import onnx

FUSED_NODES = {("", "Attention"), ("com.microsoft", "MultiHeadAttention")}


def drop_unused_outputs(model: onnx.ModelProto) -> int:
    """Blank the unused outputs of fused attention nodes; return how many were blanked.

    torch's ONNX tracer gives a node every output in its schema. An unused `qk` output
    would still be computed by ONNX Runtime (and ORT cannot infer its type), so unused
    outputs become "" (ONNX's "not produced").
    """
    graph = model.graph
    used = {name for node in graph.node for name in node.input}
    used |= {out.name for out in graph.output}
    blanked = 0
    for node in graph.node:
        if (node.domain, node.op_type) not in FUSED_NODES:
            continue
        for i, name in enumerate(node.output):
            if i > 0 and name and name not in used:
                node.output[i] = ""
                blanked += 1
        while node.output and node.output[-1] == "":
            node.output.pop()
    drop_value_infos(model, used)
    return blanked


def drop_value_infos(model: onnx.ModelProto, used: set[str]) -> None:
    """Remove value_info entries of values no node produces any more."""
    produced = {name for node in model.graph.node for name in node.output if name}
    keep = [vi for vi in model.graph.value_info if vi.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node counts by "domain.OpType" (domain omitted for the default domain)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


def fused_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The fused attention nodes of the main graph."""
    return [n for n in model.graph.node if (n.domain, n.op_type) in FUSED_NODES]


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Set (replace) metadata_props entries."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)


def annotate_fused_outputs(model: onnx.ModelProto, elem_type: int) -> None:
    """Declare the element type of the fused nodes' extra outputs.

    MultiHeadAttention's `qk` output has a type parameter of its own that ORT cannot infer
    from the inputs ("type inference failed"), so its type is written into value_info.
    """
    graph = model.graph
    known = {vi.name for vi in graph.value_info} | {o.name for o in graph.output}
    for node in fused_nodes(model):
        for name in node.output[1:]:
            if name and name not in known:
                graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem_type, None))


def set_shape(value: onnx.ValueInfoProto, dims: list[str | int]) -> None:
    """Replace a value's declared shape: str = named dynamic axis, int = fixed size."""
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


def name_io_axes(model: onnx.ModelProto, shapes: dict[str, list[str | int]]) -> None:
    """Give graph inputs/outputs the tensor contract's axis names (B, L, S; docs/architecture.md).

    The tracer names axes s0, s1, ... and ONNX shape inference of Attention's
    qk_matmul_output leaves the key axis as 0, so the contract's shapes are written here.
    """
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in shapes:
            set_shape(value, shapes[value.name])
    names = {o.name for o in model.graph.output}
    keep = [vi for vi in model.graph.value_info if vi.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
