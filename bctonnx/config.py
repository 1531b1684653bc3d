"""Compression configs and presets.

A config says, for each class of tensor, which block format it gets (None = left in FP32):
``weights`` (MatMul/Gemm weights), ``embeddings`` (word/position/token-type tables) and
``activations`` (every intermediate result feeding compute, dynamic per-block scales).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import Any, Literal

from .blockformat import BlockFormat

# integer (the default): GELU, Softmax, LayerNorm, activation quantization and the linear
# layers as bctonnx's native integer ops (running it needs the op library). qdq: portable
# QuantizeLinear/DequantizeLinear that stock onnxruntime runs; also the form of configs the
# integer one cannot express (activations left in float, or wider than 8 bits).
Mode = Literal["qdq", "integer"]
MODES = ("integer", "qdq")


@dataclass(frozen=True)
class TokenStage:
    """Token downsampling: after ``layer`` encoder layers, each sequence keeps ``keep`` of its
    real tokens (passes/token_drop.py)."""

    keep: float
    layer: int

    def describe(self) -> str:
        return f"{self.keep:g}@{self.layer}"


# --token-keep K without --token-keep-from: tokens leave after this many encoder layers
DEFAULT_TOKEN_KEEP_FROM = 3
# how tokens are ranked: auto = redundancy for a model with a full-length output (sentence
# embeddings), else attention; attention = received from all real tokens; cls = received from
# [CLS]; redundancy = 2 - cosine to the most similar other token (passes/token_drop.py)
TOKEN_SCORES = ("auto", "attention", "cls", "redundancy")
TOKEN_OUTPUTS = ("copy", "frozen")


def parse_token_keep(
    spec: str | float | None, default_layer: int | None = None
) -> tuple[TokenStage, ...]:
    """``--token-keep``: ``K`` (from ``default_layer``, else `DEFAULT_TOKEN_KEEP_FROM`) or
    stages ``K@L,K@L`` (deeper stages keep no more); ``None`` / ``""`` = no token dropping.
    Raises ValueError with a one-line reason."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return ()
    parts = [str(spec)] if not isinstance(spec, str) else spec.split(",")
    stages = []
    for part in (p.strip() for p in parts):
        keep_text, at, layer_text = part.partition("@")
        try:
            keep = float(keep_text)
            layer = int(layer_text) if at else None
        except ValueError:
            raise ValueError(
                f"token keep {spec!r}: expected K or K@L stages (e.g. 0.5 or 0.7@2,0.5@4), "
                f"got {part!r}"
            ) from None
        if layer is None:
            if len(parts) > 1:
                raise ValueError(f"token keep {spec!r}: with several stages each needs @L")
            layer = DEFAULT_TOKEN_KEEP_FROM if default_layer is None else default_layer
        elif default_layer is not None:
            raise ValueError(f"token keep {spec!r}: give the layer with @L or --token-keep-from")
        if not 0 < keep <= 1 or keep != keep:
            raise ValueError(f"token keep fraction {keep_text!r} is not in (0, 1]")
        if Fraction(keep).limit_denominator(1000) != Fraction(keep_text.strip()):
            raise ValueError(f"token keep fraction {keep_text!r}: at most 3 decimals")
        if layer < 1:
            raise ValueError(f"token keep from layer {layer}: tokens can leave after layer 1 on")
        stages.append(TokenStage(keep, layer))
    for a, b in zip(stages, stages[1:], strict=False):
        if b.layer <= a.layer or b.keep > a.keep:
            raise ValueError(
                f"token keep {spec!r}: stages must go deeper and keep no more "
                f"({a.describe()} then {b.describe()})"
            )
    return tuple(stages)


@dataclass(frozen=True)
class CompressionConfig:
    weights: BlockFormat | None = None
    embeddings: BlockFormat | None = None
    activations: BlockFormat | None = None
    mode: Mode = "integer"
    exclude: tuple[str, ...] = field(default_factory=tuple)
    # storage of the tensors left in floating point (biases, LayerNorm, excluded weights)
    float_dtype: Literal["float32", "float16"] = "float32"
    # per-node weight formats: (glob on the MatMul/Gemm node name, format); the first match
    # wins over ``weights`` (mixed precision, e.g. from bctonnx.sensitivity)
    weight_overrides: tuple[tuple[str, BlockFormat], ...] = field(default_factory=tuple)
    # integer mode: a linear layer whose weight blocks are larger than the activation blocks
    # (and a multiple of them) reads its activations re-blocked to the weight block size
    # (BlockRequantize: BlockQuantize of the same real values at the larger block), so every
    # K segment of its integer product has one activation and one weight scale. The
    # activations everywhere else (residual stream, GELU, attention) keep their blocks.
    match_weight_blocks: bool = False
    # the embeddings' block size is a maximum: a table whose hidden size it does not divide
    # takes their greatest common divisor (presets; an explicit block size must divide)
    fit_embedding_blocks: bool = False
    # structured pruning (passes/prune_heads.py, passes/prune_ffn.py): the fraction of every
    # FFN block's neurons / every attention block's heads removed, each followed by a ridge
    # least-squares refit of the consuming layer on calibration text; per-layer fractions
    # override them: (glob on the consuming linear node's name, fraction), first match wins
    prune_ffn: float = 0.0
    prune_heads: float = 0.0
    prune_overrides: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    # calibration text of pruning and N:M sparsity: a file (one text per line, a tab between
    # a pair), None = the package's corpus (bctonnx/data/calibration.txt)
    calib_texts: str | None = None
    # --target-ratio: a label-free search (bctonnx.search) picks per-layer bits, pruning and
    # N:M for at least this compression ratio; compress_model runs it, the result is a
    # config with the choices in weight_overrides / prune_overrides and this field None
    target_ratio: float | None = None

    @property
    def needs_calibration(self) -> bool:
        """Whether compressing with this config reads calibration text."""
        nm = any(
            f is not None and f.nm_m > 0
            for f in [self.weights, *(f for _, f in self.weight_overrides)]
        )
        pruned = self.prune_ffn > 0 or self.prune_heads > 0
        return pruned or nm or any(f > 0 for _, f in self.prune_overrides)

    # token downsampling (passes/token_drop.py): stages; how tokens are ranked (attention
    # received from all real tokens or from [CLS]); whether the tokens that leave are merged
    # into the kept ones (else dropped); what a full-length output (last_hidden_state, only
    # if the model has one) holds for a token that left; the ids of the special tokens always
    # kept (None: read from the model's tokenizer when there is one)
    token_keep: tuple[TokenStage, ...] = field(default_factory=tuple)
    token_score: str = "auto"
    token_merge: bool = True
    token_output: str = "copy"
    special_token_ids: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        parts = []
        for name in ("weights", "embeddings", "activations"):
            fmt = getattr(self, name)
            if fmt is not None and name == "activations" and self.mode == "integer":
                # the integer form quantizes activations with BCT's shift scales
                fmt = replace(fmt, scale_kind="pow2", frac_bits=0)
            text = fmt.describe() if fmt else "fp32"
            if fmt is not None and name == "embeddings" and self.fit_embedding_blocks:
                # a maximum: a table whose hidden size it does not divide takes their gcd
                text = text.replace(f"b{fmt.block_size}", f"b<={fmt.block_size}", 1)
            parts.append(f"{name}={text}")
        extra = ", floats=fp16" if self.float_dtype == "float16" else ""
        if self.match_weight_blocks and self.mode == "integer":
            extra += ", linear inputs in weight blocks"
        if self.weight_overrides:
            extra += f", {len(self.weight_overrides)} weight override(s)"
        if self.prune_ffn:
            extra += f", FFN neurons pruned {self.prune_ffn:g}"
        if self.prune_heads:
            extra += f", heads pruned {self.prune_heads:g}"
        if self.prune_overrides:
            extra += f", {len(self.prune_overrides)} pruning override(s)"
        if self.target_ratio:
            extra += f", target ratio {self.target_ratio:g}"
        if self.token_keep:
            extra += f", tokens kept {','.join(s.describe() for s in self.token_keep)}"
            extra += " merged" if self.token_merge else " dropped"
            if self.token_score != "auto":
                extra += f" by {self.token_score}"
            if self.token_output != "copy":
                extra += f", {self.token_output} outputs"
        return ", ".join(parts) + f", mode={self.mode}{extra}"


# Presets. Block sizes and scale kinds are chosen so the whole file (scales, biases, graph)
# reaches the stated ratio on BERT-family models; see README "Presets" for measured numbers.
PRESETS: dict[str, CompressionConfig] = {
    # int8 everywhere: weights in blocks of 128 with a one-byte scale (fractional pow2, steps
    # of 2^(1/8)); embedding rows in blocks of 384 (gcd with the hidden size where 384 does
    # not divide it: 128 for BERT-large's 1024); activations in blocks of 32 with run-time
    # scales; biases and LayerNorm stored as float16. On MiniLM the file is 0.3% smaller than
    # onnxruntime's dynamic int8 (blocks of 128 and float32 biases: 0.2% larger).
    "w8a8": CompressionConfig(
        weights=BlockFormat(bits=8, block_size=128, scale_kind="pow2", frac_bits=3),
        embeddings=BlockFormat(bits=8, block_size=384, scale_kind="pow2", frac_bits=3),
        activations=BlockFormat(bits=8, block_size=32),
        float_dtype="float16",
        fit_embedding_blocks=True,
    ),
    # 4-bit weights in asymmetric blocks of 32 (zero point per block) inside superblocks of
    # 384 (one byte pow2 code each; a 4-bit multiplier per block, chosen by squared error:
    # 0.7% less weight error than free per-block codes), 4-bit asymmetric embeddings in blocks
    # of 128, 8-bit activations, biases and LayerNorm stored as float16: >= 7.5x on MiniLM.
    # The integer kernels widen each superblock to int8 exactly and (match_weight_blocks)
    # read the linear layers' inputs in blocks of 128: one float step per 128 of K.
    "w4a8": CompressionConfig(
        weights=BlockFormat(
            bits=4,
            block_size=32,
            scale_kind="pow2",
            frac_bits=3,
            clip="mse",
            symmetric=False,
            superblock=384,
        ),
        embeddings=BlockFormat(
            bits=4, block_size=128, scale_kind="pow2", frac_bits=3, clip="mse", symmetric=False
        ),
        activations=BlockFormat(bits=8, block_size=32),
        float_dtype="float16",
        match_weight_blocks=True,  # integer mode: linear inputs in blocks of 128
    ),
}


# w8a8 in integer mode with the linear layers' inputs re-blocked to their weights' 128 (one
# activation and one weight scale per 128-long K segment: a quarter of the float steps of
# 32-long ones; BlockMatMul ~1.7x faster on MiniLM, embedding cosine 0.9966 vs 0.9979).
PRESETS["w8a8-fast"] = replace(PRESETS["w8a8"], mode="integer", match_weight_blocks=True)


def resolve_config(
    preset: str | CompressionConfig = "w8a8",
    *,
    weight_bits: int | None = None,
    embedding_bits: int | None = None,
    act_bits: int | None = None,
    block_size: int | None = None,
    weight_block_size: int | None = None,
    embedding_block_size: int | None = None,
    act_block_size: int | None = None,
    scale_kind: str | None = None,
    scale_dtype: str | None = None,
    frac_bits: int | None = None,
    scale_bits: int | None = None,
    superblock: int | None = None,
    symmetric: bool | None = None,
    clip: str | None = None,
    float_dtype: str | None = None,
    mode: str | None = None,
    exclude: tuple[str, ...] | list[str] | None = None,
    no_activations: bool = False,
    match_weight_blocks: bool | None = None,
    prune_ffn: float | None = None,
    prune_heads: float | None = None,
    sparsity: str | None = None,
    target_ratio: float | None = None,
    calib_texts: str | None = None,
    token_keep: str | float | None = None,
    token_keep_from: int | None = None,
    token_score: str | None = None,
    token_merge: bool | None = None,
    token_output: str | None = None,
) -> CompressionConfig:
    """A preset with explicit overrides applied (None = keep the preset's value).

    ``block_size`` sets all three block sizes; the specific ones win over it. ``scale_kind``,
    ``scale_dtype``, ``frac_bits``, ``symmetric`` and ``clip`` apply to stored tensors (weights
    and embeddings); ``scale_bits`` to weights only (embedding rows are gathered with their
    scales, so they keep one byte per scale); activation scales are computed at run time.
    ``superblock`` groups the weights' blocks (0 = none; see `blockformat`); a preset's
    superblock is dropped when the overrides leave a format it does not fit (more than 4
    bits, float scales, blocks that do not divide it). ``float_dtype`` is how tensors left in
    floating point are stored. ``mode``: None keeps the preset's (integer), except for what
    the integer form cannot express (no quantized activations, or wider than 8 bits): qdq.
    ``match_weight_blocks``: in integer mode, linear layers read
    their activations in their weight block size (with superblocks: the superblock size).
    ``prune_ffn`` / ``prune_heads``: fraction of FFN neurons / attention heads removed (0..1),
    ``sparsity``: ``"N:M"`` (2:4, 4:8; ``"none"`` = dense) on the weights, ``calib_texts``:
    calibration text file for those (None = the package's corpus), ``target_ratio``: search
    per-layer bits, pruning and N:M for at least that compression ratio (`bctonnx.search`).
    ``token_keep``: token downsampling, ``"K"`` (from layer ``token_keep_from``, default
    `DEFAULT_TOKEN_KEEP_FROM`) or stages ``"K@L,K@L"`` (`parse_token_keep`); ``token_score``
    (`TOKEN_SCORES`): how tokens are ranked; ``token_merge``: the tokens that leave are merged into the kept ones (default)
    or dropped; ``token_output`` ``"copy"`` / ``"frozen"``: what a full-length output
    (last_hidden_state) holds for a token that left (passes/token_drop.py).
    """
    if isinstance(preset, CompressionConfig):
        config = preset
    else:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        config = PRESETS[preset]

    def stored(fmt: BlockFormat | None, bits: int | None, block: int | None) -> BlockFormat | None:
        if fmt is None:
            return None
        changes: dict[str, Any] = {}
        if bits is not None:
            changes["bits"] = bits
        if block is not None:
            changes["block_size"] = block
        if scale_kind is not None:
            changes["scale_kind"] = scale_kind
        if scale_dtype is not None:
            changes["scale_dtype"] = scale_dtype
        if frac_bits is not None:
            changes["frac_bits"] = frac_bits
        elif scale_kind == "pow2" and fmt.scale_kind != "pow2":
            changes["frac_bits"] = 0
        if symmetric is not None:
            changes["symmetric"] = symmetric
        if clip is not None:
            changes["clip"] = clip
        if scale_kind == "float":
            changes["scale_bits"] = 8
        return replace(fmt, **changes)

    acts = config.activations
    if no_activations:
        acts = None
    elif acts is not None:
        changes: dict[str, Any] = {}
        if act_bits is not None:
            changes["bits"] = act_bits
        if (act_block_size or block_size) is not None:
            changes["block_size"] = act_block_size or block_size
        acts = replace(acts, **changes)
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode is None and (acts is None or acts.bits > 8):
        mode = "qdq"  # what the integer form cannot express: the portable form, unasked
    weights = config.weights
    if weights is not None:
        sb = weights.superblock if superblock is None else superblock
        # the other overrides first, on plain blocks; then the superblock, if it fits
        weights = stored(
            replace(weights, superblock=0), weight_bits, weight_block_size or block_size
        )
        if scale_bits is not None:
            weights = replace(weights, scale_bits=scale_bits)
        if sb:
            try:
                weights = replace(weights, superblock=sb)
            except ValueError:
                if superblock is not None:
                    raise  # the caller's own superblock does not fit: say so
                # the preset's does not fit the overridden format: plain blocks
    nm = config.weights.nm if config.weights is not None else (0, 0)
    if sparsity is not None:
        nm = parse_sparsity(sparsity)
        if weights is None and nm != (0, 0):
            raise ValueError("--sparsity applies to quantized weights (the config has none)")
    if weights is not None and nm != weights.nm:
        try:
            weights = replace(weights, nm_n=nm[0], nm_m=nm[1])
        except ValueError as exc:
            raise ValueError(f"--sparsity {nm[0]}:{nm[1]}: {exc}") from None
    for name, value in (("prune_ffn", prune_ffn), ("prune_heads", prune_heads)):
        if value is not None and not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if target_ratio is not None and not target_ratio > 1:
        raise ValueError(f"target ratio must be > 1, got {target_ratio}")
    if float_dtype is not None and float_dtype not in ("float32", "float16"):
        raise ValueError(f"float dtype must be float32 or float16, got {float_dtype!r}")
    return CompressionConfig(
        weights=weights,
        embeddings=stored(config.embeddings, embedding_bits, embedding_block_size or block_size),
        activations=acts,
        mode=mode or config.mode,  # type: ignore[arg-type]
        exclude=tuple(exclude) if exclude is not None else config.exclude,
        float_dtype=float_dtype or config.float_dtype,  # type: ignore[arg-type]
        weight_overrides=config.weight_overrides,
        match_weight_blocks=(
            config.match_weight_blocks if match_weight_blocks is None else match_weight_blocks
        ),
        fit_embedding_blocks=config.fit_embedding_blocks
        and (embedding_block_size or block_size) is None,
        prune_ffn=config.prune_ffn if prune_ffn is None else float(prune_ffn),
        prune_heads=config.prune_heads if prune_heads is None else float(prune_heads),
        prune_overrides=config.prune_overrides,
        calib_texts=config.calib_texts if calib_texts is None else str(calib_texts),
        target_ratio=config.target_ratio if target_ratio is None else float(target_ratio),
        **_token_settings(
            config, token_keep, token_keep_from, token_score, token_merge, token_output
        ),
    )


def _token_settings(
    config, token_keep, token_keep_from, token_score, token_merge, token_output
) -> dict:
    stages = config.token_keep
    if token_keep is not None:
        stages = parse_token_keep(token_keep, token_keep_from)
    given = {
        "--token-keep-from": token_keep_from,
        "--token-score": token_score,
        "--token-merge": token_merge,
        "--token-output": token_output,
    }
    for flag, value in given.items():
        if value is not None and not stages:
            raise ValueError(f"{flag} needs --token-keep (token downsampling is off)")
    if token_score is not None and token_score not in TOKEN_SCORES:
        raise ValueError(f"token score must be one of {', '.join(TOKEN_SCORES)}")
    if token_output is not None and token_output not in TOKEN_OUTPUTS:
        raise ValueError(f"token output must be one of {', '.join(TOKEN_OUTPUTS)}")
    return {
        "token_keep": stages,
        "token_score": token_score or config.token_score,
        "token_merge": config.token_merge if token_merge is None else token_merge,
        "token_output": token_output or config.token_output,
        "special_token_ids": config.special_token_ids,
    }


def parse_sparsity(text: str) -> tuple[int, int]:
    """``"N:M"`` -> (N, M); ``"none"`` / ``"0"`` -> (0, 0) (dense)."""
    if str(text).strip().lower() in ("none", "0", "dense", ""):
        return (0, 0)
    try:
        n, m = (int(p) for p in str(text).split(":"))
    except ValueError:
        raise ValueError(f"sparsity must be N:M (e.g. 2:4, 4:8), got {text!r}") from None
    if (n, m) not in SPARSITIES:
        raise ValueError(
            f"sparsity {n}:{m} is not supported; choose "
            + ", ".join(f"{a}:{b}" for a, b in SPARSITIES)
        )
    return n, m


SPARSITIES = ((2, 4), (4, 8), (1, 4), (2, 8))


def distinct_configs(combos: list[tuple[str, Any, CompressionConfig]]) -> list:
    """``(preset, ..., config)`` tuples with one per distinct compression (same `describe`),
    in their order; of equal ones, one that keeps every setting of its preset (w8a8-fast in qdq
    mode is w8a8's qdq form without w8a8-fast's integer-only re-blocking: the w8a8 entry
    stays)."""

    def natural(item) -> bool:
        preset, config = item[0], item[-1]
        if preset not in PRESETS:
            return False
        own = PRESETS[preset]
        return own.mode == config.mode or not own.match_weight_blocks

    keep: dict[str, Any] = {}
    for item in combos:
        key = item[-1].describe()
        if key not in keep or (natural(item) and not natural(keep[key])):
            keep[key] = item
    chosen = {id(v) for v in keep.values()}
    return [item for item in combos if id(item) in chosen]


# --- configs as plain data (eval's --config files, the Olive pass) -----------------------------


def config_keywords() -> dict[str, type | tuple[type, ...]]:
    """resolve_config's keywords and the JSON type each takes (read from its signature, so
    new keywords are accepted without touching the readers)."""
    kinds: dict[str, type] = {}
    for name, param in inspect.signature(resolve_config).parameters.items():
        if param.kind != inspect.Parameter.KEYWORD_ONLY:
            continue
        ann = str(param.annotation)
        kinds[name] = (
            list if ("tuple" in ann or "list" in ann) else bool if "bool" in ann else
            (str, float) if ("str" in ann and "float" in ann) else
            float if "float" in ann else int if "int" in ann else str
        )  # fmt: skip
    return kinds


def config_from_dict(
    entry: object, where: str, ignore: tuple[str, ...] = ("name",)
) -> CompressionConfig:
    """A config from a JSON-like dict: ``preset`` (default w8a8) and resolve_config keywords
    (None = the preset's value); ``ignore``: keys the caller reads itself. Unknown keys and
    wrong types are a `BctError` that starts with ``where``."""
    from .errors import BctError

    if not isinstance(entry, dict):
        raise BctError(f"{where}: each config must be a JSON object of resolve_config keywords")
    kinds = config_keywords()
    overrides = {k: v for k, v in entry.items() if k not in (*ignore, "preset")}
    unknown = sorted(set(overrides) - set(kinds))
    if unknown:
        raise BctError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: "
            f"{', '.join((*ignore, 'preset', *kinds))}"
        )
    for key, value in overrides.items():
        kind = kinds[key]
        ok = (
            isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        ) or value is None
        if kind in (float, (str, float)) and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if kind is list and isinstance(value, list):
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            kind_name = (
                " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
            )
            raise BctError(f"{where}: {key} must be {kind_name}, got {value!r}")
    preset = entry.get("preset", "w8a8")
    try:
        return resolve_config(preset, **overrides)
    except (ValueError, TypeError) as exc:
        raise BctError(f"{where}: {exc}") from None
