"""Make ONNX Runtime's com.microsoft operator schemas known to onnx (and so to onnxscript).

onnxscript looks an operator up in onnx's schema registry before it emits it, and onnx does
not ship the com.microsoft domain; ONNX Runtime does, so its schema is copied across once.
"""

from __future__ import annotations

import onnx.defs
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

_OPTION = {
    "Single": onnx.defs.OpSchema.FormalParameterOption.Single,
    "Optional": onnx.defs.OpSchema.FormalParameterOption.Optional,
    "Variadic": onnx.defs.OpSchema.FormalParameterOption.Variadic,
}


def _params(params: list) -> list[onnx.defs.OpSchema.FormalParameter]:
    return [
        onnx.defs.OpSchema.FormalParameter(
            p.name,
            p.typeStr,
            p.description,
            param_option=_OPTION[str(p.option).rsplit(".", 1)[-1]],
            is_homogeneous=p.isHomogeneous,
        )
        for p in params
    ]


def _attributes(schema) -> list[onnx.defs.OpSchema.Attribute]:
    return [
        onnx.defs.OpSchema.Attribute(
            a.name,
            # pybind11 enums take their int value at runtime; the stub does not say so.
            onnx.defs.OpSchema.AttrType(int(a.type)),  # type: ignore[call-arg]
            a.description,
            required=a.required,
        )
        for a in schema.attributes.values()
    ]


def register_contrib_schema(name: str, domain: str = "com.microsoft") -> None:
    """Register ORT's schema of domain::name with onnx, unless onnx already knows it."""
    if onnx.defs.has(name, domain):
        return
    found = [
        s for s in ort_state.get_all_operator_schema() if s.name == name and s.domain == domain
    ]
    if not found:
        raise RuntimeError(f"onnxruntime has no schema for {domain}::{name}")
    schema = max(found, key=lambda s: s.since_version)
    onnx.defs.register_schema(
        onnx.defs.OpSchema(
            name,
            domain,
            schema.since_version,
            schema.doc or "",
            inputs=_params(schema.inputs),
            outputs=_params(schema.outputs),
            type_constraints=[
                (t.type_param_str, list(t.allowed_type_strs), t.description)
                for t in schema.type_constraints
            ],
            attributes=_attributes(schema),
        )
    )
