"""BCTCompression: bctonnx's compression as a pass of an Olive workflow.

Takes the ONNX model of the previous pass (an export, ``OrtTransformersOptimization``'s fused
graph, ...) and returns the compressed one, as ``bctonnx compress`` writes it for the same
input and flags. Its config is a preset and every compression option, as
`bctonnx.resolve_config` keywords (None keeps the preset's value):

    {"type": "BCTCompression", "preset": "w4a8", "mode": "qdq", "block_size": 64,
     "exclude": ["*/pooler/*"]}

``mode``: "integer" (the default) needs bctonnx's op library to run
(`bctonnx.session_options()`); "qdq" runs on stock onnxruntime, so Olive's own evaluators can
run it too (they register no custom-op library but onnxruntime-extensions'). Olive finds the
pass through a package config: see `bctonnx.integrations.olive`.
"""

from __future__ import annotations

from pathlib import Path

from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes import Pass
from olive.passes.onnx.common import get_external_data_config, model_proto_to_olive_model
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from ...api import compress_model
from ...config import PRESETS, config_from_dict, config_keywords

_TYPES = {list: list[str], bool: bool, int: int, str: str}


def compression_config(config) -> dict:
    """The pass config's compression settings: ``preset`` and the keywords that are set."""
    settings = {"preset": config.preset}
    for key in config_keywords():
        value = getattr(config, key)
        if value is not None:
            settings[key] = value
    return settings


class BCTCompression(Pass):
    """Blockwise compression (BCT) of a BERT-family ONNX model: bctonnx's preset and options."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        params = {
            "preset": PassConfigParam(
                type_=str,
                default_value="w8a8",
                description=f"starting point: one of {', '.join(PRESETS)}",
            )
        }
        for key, kind in config_keywords().items():
            params[key] = PassConfigParam(
                type_=_TYPES[kind],
                default_value=None,
                description=f"bctonnx.resolve_config's {key} (None: the preset's value); "
                f"`bctonnx compress --{key.replace('_', '-')}`",
            )
        params.update(get_external_data_config())
        return params

    def _run_for_config(
        self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        settings = compression_config(config)
        compression = config_from_dict(settings, "BCTCompression")
        output_model_path = resolve_onnx_path(output_model_path, Path(model.model_path).name)
        result = compress_model(model.model_path, compression)
        return model_proto_to_olive_model(result.model, output_model_path, config)
