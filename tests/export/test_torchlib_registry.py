"""The torchlib registry built once and copied per export: same registry, base untouched."""

from __future__ import annotations

from torch.onnx._internal.exporter import _registration

from mha.export import torchlib_registry

OPSET = 23


def _decompositions(registry) -> dict:
    return {
        target: [m.onnx_function for m in metas] for target, metas in registry.functions.items()
    }


def test_a_reused_registry_equals_a_fresh_one_and_custom_ops_stay_in_the_copy():
    fresh = _registration.ONNXRegistry.from_torchlib(OPSET)
    with torchlib_registry.reused():
        first = _registration.ONNXRegistry.from_torchlib(OPSET)
        first.register_op("mha_test::fused", lambda: None)
        second = _registration.ONNXRegistry.from_torchlib(opset_version=OPSET)
    assert first is not second and first.opset_version == second.opset_version == OPSET
    assert _decompositions(second) == _decompositions(fresh)
    assert "mha_test::fused" in first.functions and "mha_test::fused" not in second.functions


def test_the_class_is_restored_after_the_block_even_on_error():
    before = vars(_registration.ONNXRegistry)["from_torchlib"]
    try:
        with torchlib_registry.reused():
            assert vars(_registration.ONNXRegistry)["from_torchlib"] is not before
            raise KeyError("inside")
    except KeyError:
        pass
    assert vars(_registration.ONNXRegistry)["from_torchlib"] is before
    assert _registration.ONNXRegistry.from_torchlib(
        OPSET
    ) is not _registration.ONNXRegistry.from_torchlib(OPSET)
