"""BCTCompression: bctonnx's compression as a pass of an Olive workflow.

Takes the ONNX model of the previous pass (an export, ``OrtTransformersOptimization``'s fused
graph, ...) and returns the compressed one, as ``bctonnx compress`` writes it for the same
input and flags. Its config is a preset and every compression option, as
`bctonnx.resolve_config` keywords (None keeps the preset's value):

    {"type": "BCTCompression", "preset": "w4a8", "mode": "qdq", "block_size": 64,
     "exclude": ["*/pooler/*"]}

and, as ``bctonnx compress --target-cosine C [--probe-texts FILE]`` does, data-free mixed
precision: ``target_cosine`` keeps the fewest, most sensitive weights at int8 until the
output cosine vs FP32 reaches it (`bctonnx.sensitivity.plan`), on ``probe_texts`` (a file, one
text per line) tokenized with ``tokenizer_dir`` (Olive hands the pass a model file in its
cache, away from the export's tokenizer: without one, the probes are random token ids).

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
from ...errors import BctError
from ...textio import find_tokenizer_dir, read_texts

_TYPES = {
    list: list[str],
    bool: bool,
    int: int,
    float: float,
    str: str,
    (str, float): str | float,
}


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
        params.update(
            target_cosine=PassConfigParam(
                type_=float,
                default_value=None,
                description="mixed precision: keep the fewest, most sensitive weights at int8 "
                "until the output cosine vs FP32 reaches this (`bctonnx compress --target-cosine`)",
            ),
            probe_texts=PassConfigParam(
                type_=str,
                default_value=None,
                description="target_cosine's probe texts: a file, one text per line "
                "(default: bctonnx's own sentences)",
            ),
            tokenizer_dir=PassConfigParam(
                type_=str,
                default_value=None,
                description="the tokenizer of the probe texts (the export's directory)",
            ),
        )
        params.update(get_external_data_config())
        return params

    def _run_for_config(
        self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        compression = config_from_dict(compression_config(config), "BCTCompression")
        if config.target_cosine is not None:
            compression = mixed_precision(model.model_path, compression, config)
        output_model_path = resolve_onnx_path(output_model_path, Path(model.model_path).name)
        result = compress_model(model.model_path, compression)
        return model_proto_to_olive_model(result.model, output_model_path, config)


def mixed_precision(model_path: str, compression, config):
    """The config `bctonnx.sensitivity.plan` picks for ``config.target_cosine``."""
    from ...sensitivity import plan

    if not 0 < config.target_cosine <= 1:
        raise BctError("BCTCompression: target_cosine must be in (0, 1]")
    texts = read_texts(config.probe_texts) if config.probe_texts else None
    tokenizer_dir = config.tokenizer_dir or find_tokenizer_dir(model_path)
    if texts and tokenizer_dir is None:
        raise BctError("BCTCompression: probe_texts needs tokenizer_dir (the export's folder)")
    try:
        return plan(
            model_path, compression, config.target_cosine, texts=texts, tokenizer_dir=tokenizer_dir
        ).config
    except ValueError as exc:
        raise BctError(f"BCTCompression: {exc}") from None
