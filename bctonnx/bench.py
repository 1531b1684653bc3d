"""bench: latency, file size and peak memory of FP32, onnxruntime's dynamic int8 and BCT presets.

    bctonnx bench MODEL_OR_DIR | --random-bert {mini,base,large} [--batch 1,8] [--seq 128[,384]]
                  [--threads 2] [--runs 20] [--presets w8a8,w8a8-fast,w4a8] [--modes integer,qdq]
                  [--token-keep K|K@L,...] [--no-peers] [--json FILE] [--plot FILE.png]

One run builds every model from the same FP32 file (an exported directory's ``model.onnx`` or
a model file; ``--random-bert SIZE``: a random-weight BERT of that size, `bctonnx.random_bert`):
onnxruntime's ``quantize_dynamic`` int8 (`bctonnx.baselines`), each preset in each lowering mode
(``integer`` is the native one, ``qdq`` the portable reference) and, with the optional extra
``bctonnx[peers]``, OpenVINO at its default precision and OpenVINO + NNCF int8 (`bctonnx.peers`;
without the extra the table says how to add them, ``--no-peers`` leaves them out). Inputs are
synthetic token ids of the given batch x sequence (`bctonnx.bench_util.fixed_inputs`).

- Latency: all sessions are created first, then the models take turns in blocks of 5 timed
  runs, each turn after at least 0.1 s of untimed ones (`bctonnx.bench_util.interleaved_latency`, warm-up
  rounds first) so a noisy machine slows every model alike while every timed run is a
  steady-state one (a run right after another model's measures onnxruntime's thread pools
  switching over); the median of ``--runs`` runs per model and shape. Token ids are drawn
  below the model's vocabulary size (read from its word-embedding table).
- File size: bytes on disk, external data included; ratio = FP32 bytes / model bytes.
- Peak RSS: each model in its own fresh subprocess (``python -m bctonnx.bench --rss-probe``)
  that imports onnxruntime, creates the session, runs the largest batch once and reports
  ``VmHWM`` from ``/proc/self/status`` (``ru_maxrss`` where /proc is absent). The same probe
  without a model gives the interpreter + onnxruntime baseline, reported separately.

A model that fails to build or load is a ``failed`` row with the reason; the others still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BctError

DEFAULT_PRESETS = ("w8a8", "w8a8-fast", "w4a8")
DEFAULT_MODES = ("integer", "qdq")
BASELINE = "ort dynamic int8"


@dataclass
class BenchRecord:
    model: str
    kind: str  # fp32 | baseline | peer | bct
    path: str = ""
    preset: str | None = None
    mode: str | None = None
    config: str = ""
    bytes: int = 0
    ratio: float = 0.0
    peak_rss_bytes: int | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # "1x128" -> median ms
    vs_baseline: dict[str, float] = field(default_factory=dict)  # latency / dynamic int8's
    vs_peer: dict[str, float] = field(default_factory=dict)  # latency / OpenVINO int8's
    status: str = "ok"
    error: str = ""


@dataclass
class BenchResult:
    model: str
    shapes: list[str]
    threads: int
    runs: int
    onnxruntime: str
    cpu: str
    rss_baseline_bytes: int | None
    records: list[BenchRecord]
    cpu_isa: str = ""  # the CPU's instruction sets that matter here (AMX or not)
    bct_isa: str = ""  # the path bctonnx's integer kernels take on it
    peers: str = ""  # OpenVINO / NNCF versions, or how to install them

    def to_dict(self) -> dict:
        return asdict(self)


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise BctError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise BctError(f"{what}: expected positive integers, got {text!r}")
    return values


def parse_names(values: list[str] | str | None, allowed, what: str) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise BctError(f"{what}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa_summary(flags: set[str] | None = None) -> str:
    """The instruction sets that decide int8 speed, e.g. 'AVX-512 VNNI, AVX-512 BF16, no AMX'."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return "unknown"
    parts = []
    if "amx_int8" in flags:
        parts.append("AMX-INT8" + (" + BF16" if "amx_bf16" in flags else ""))
    if "avx512_vnni" in flags:
        parts.append("AVX-512 VNNI")
    elif "avx512f" in flags:
        parts.append("AVX-512 (no VNNI)")
    if "avx512_bf16" in flags:
        parts.append("AVX-512 BF16")
    if "avx_vnni" in flags:
        parts.append("AVX-VNNI")
    if not any(p.startswith("AVX-512") for p in parts) and "avx2" in flags:
        parts.append("AVX2")
    if "amx_int8" not in flags:
        parts.append("no AMX")
    return ", ".join(parts)


def bct_kernel_isa() -> str:
    """The instruction set bctonnx's BlockMatMul takes here (BCTONNX_ISA included)."""
    import ctypes

    from .runtime import op_library_path

    path = op_library_path()
    if path is None:
        return "op library not built"
    level = ctypes.CDLL(path).bctonnx_block_matmul_isa(None)
    return {0: "scalar", 1: "avx2", 2: "avx512", 3: "amx"}.get(level, "unknown")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Peak RSS, measured in a fresh process per model


def _rss_probe(path: str | None, batch: int, seq: int, threads: int, runtime: str = "ort") -> int:
    """Create a session for ``path`` (None: nothing) with onnxruntime (``runtime`` "ort") or
    OpenVINO ("ov"), run it once, return the peak RSS bytes."""
    if path and runtime == "ov":
        from . import peers
        from .bench_util import synthetic_feeds

        compiled = peers.compile_model(path, threads)
        names = [i.get_any_name() for i in compiled.inputs]
        peers.runner(compiled, synthetic_feeds(names, batch, seq, vocab=30000))()
    elif path:
        from .bench_util import fixed_inputs
        from .runtime import make_session

        session = make_session(path, threads)
        session.run(None, fixed_inputs(session, batch, seq, vocab=max(vocab_size(path), 101)))
    else:
        import onnxruntime  # noqa: F401 - the baseline: interpreter + onnxruntime loaded
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_rss(
    path: str | None, batch: int, seq: int, threads: int, timeout: float = 600, runtime: str = "ort"
) -> int:
    """Peak RSS (bytes) of a fresh process that loads ``path`` and runs it once."""
    cmd = [sys.executable, "-m", "bctonnx.bench", "--rss-probe", path or "", str(batch), str(seq)]
    cmd += [str(threads), runtime]
    # the probe must import this very bctonnx (and its op library), not whatever the current
    # directory holds: run it elsewhere with this package's parent first on the path
    import bctonnx

    root = str(Path(bctonnx.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir(), env=env
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"RSS probe failed: {tail[0]}")
    return int(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The benchmark


def vocab_size(path: str | os.PathLike, default: int = 1000) -> int:
    """Rows of the table that input_ids index (see bctonnx.validate.vocab_size)."""
    import onnx

    from .textio import vocab_size as proto_vocab_size

    return proto_vocab_size(onnx.load(str(path), load_external_data=False), default)


def _build_models(
    src: Path, workdir: Path, presets, modes, block_size, progress, structure=None, tokens=()
) -> list[BenchRecord]:
    from .api import compress_file
    from .baselines import quantize_dynamic_int8
    from .config import distinct_configs, resolve_config
    from .modelio import model_file_bytes

    fp32_bytes = model_file_bytes(src)
    records = [BenchRecord("fp32", "fp32", str(src), config="FP32", bytes=fp32_bytes, ratio=1.0)]
    baseline = BenchRecord(
        BASELINE, "baseline", config="quantize_dynamic: int8 weights, per-tensor activations"
    )
    records.append(baseline)
    try:
        progress(f"build {BASELINE}")
        baseline.path = str(quantize_dynamic_int8(src, workdir / "dynamic_int8.onnx"))
    except Exception as exc:  # noqa: BLE001 - a failed baseline is a row, not the end
        baseline.status, baseline.error = "failed", f"{type(exc).__name__}: {exc}"
    combos = [
        (preset, mode, "", resolve_config(preset, mode=mode, block_size=block_size))
        for preset in presets
        for mode in modes
    ]
    if structure:  # each preset also with pruning / sparsity (the plain one stays, to compare)
        from .evaluate import structure_tag

        tag = structure_tag(structure)
        combos += [(p, m, f" {tag}", resolve_config(c, **structure)) for p, m, _, c in list(combos)]
    plain = [(p, m, c) for p, m, tag, c in combos if not tag]
    variants = [(p, m, "", c) for p, m, c in token_variants(plain, tokens)]
    for preset, mode, tag, config in distinct_configs(combos) + variants:
        name = f"bct {preset} {mode}{tag}" + _schedule(config)
        rec = BenchRecord(name, "bct", preset=preset, mode=mode, config=config.describe())
        records.append(rec)
        try:
            progress(f"compress {name[4:]}")
            out = (
                workdir / f"{name[4:].replace(' ', '-').replace('@', 'at').replace(':', '-')}.onnx"
            )
            compress_file(src, out, config)
            rec.path = str(out)
        except Exception as exc:  # noqa: BLE001
            rec.status, rec.error = "failed", f"{type(exc).__name__}: {exc}"
    for rec in records:
        if rec.status == "ok":
            rec.bytes = model_file_bytes(rec.path)
            rec.ratio = fp32_bytes / rec.bytes
    return records


def _build_peers(src: Path, workdir: Path, seq: int, progress) -> list[BenchRecord]:
    """OpenVINO at its default precision and OpenVINO + NNCF int8 (bctonnx.peers)."""
    from . import peers
    from .modelio import model_file_bytes
    from .textio import default_texts, find_tokenizer_dir

    fp32_bytes = model_file_bytes(src)
    ov_fp32 = BenchRecord(
        peers.OPENVINO, "peer", str(src), config="OpenVINO, default CPU inference precision",
        bytes=fp32_bytes, ratio=1.0,
    )  # fmt: skip
    ov_int8 = BenchRecord(peers.OPENVINO_INT8, "peer", config="")
    try:
        progress(f"build {peers.OPENVINO_INT8}")
        texts = calibration_texts(peers.CALIBRATION_SENTENCES) or default_texts()
        feeds = peers.calibration_feeds(src, texts, find_tokenizer_dir(src), vocab_size(src), seq)
        xml = peers.quantize_nncf_int8(src, workdir / "openvino_int8.xml", feeds)
        ov_int8.path = str(xml)
        ov_int8.bytes = peers.ir_bytes(xml)
        ov_int8.ratio = fp32_bytes / ov_int8.bytes
        ov_int8.config = f"NNCF int8 post-training, {len(feeds)} unlabeled sentences"
    except Exception as exc:  # noqa: BLE001 - a failed peer is a row, not the end
        ov_int8.status, ov_int8.error = "failed", f"{type(exc).__name__}: {exc}"
    return [ov_fp32, ov_int8]


def calibration_texts(n: int) -> list[str]:
    """Up to ``n`` unlabeled sentences from the package's calibration text (empty if none)."""
    from importlib import resources

    data = resources.files("bctonnx.data")
    for name in ("calibration.txt", "sentences.txt"):
        f = data / name
        if f.is_file():
            lines = [ln.split("\t")[0].strip() for ln in f.read_text("utf-8").splitlines()]
            lines = [ln for ln in lines if ln]
            if lines:
                return lines[:n]
    return []


def _runners(records, threads: int, batch: int, seq: int, vocab: int, cache: dict):
    """name -> a callable running that model once on fixed synthetic inputs; records whose
    model does not load become failed rows. ``cache`` keeps the sessions across shapes."""
    from .bench_util import fixed_inputs, synthetic_feeds
    from .runtime import make_session

    fns = {}
    for rec in records:
        if rec.status != "ok":
            continue
        try:
            if rec.kind == "peer":
                from . import peers

                if rec.model not in cache:
                    cache[rec.model] = peers.compile_model(rec.path, threads)
                compiled = cache[rec.model]
                names = [i.get_any_name() for i in compiled.inputs]
                fns[rec.model] = peers.runner(compiled, synthetic_feeds(names, batch, seq, vocab))
            else:
                if rec.model not in cache:
                    cache[rec.model] = make_session(rec.path, threads)
                sess = cache[rec.model]
                feeds = fixed_inputs(sess, batch, seq, vocab=vocab)
                fns[rec.model] = lambda s=sess, f=feeds: s.run(None, f)
        except Exception as exc:  # noqa: BLE001
            rec.status, rec.error = "failed", f"{type(exc).__name__}: {exc}"
    return fns


def _schedule(config) -> str:
    """' keep 0.5@3' (+ ' dropped', ' by cls', ...) for a token-downsampling config."""
    if not config.token_keep:
        return ""
    text = " keep " + ",".join(s.describe() for s in config.token_keep)
    text += "" if config.token_merge else " dropped"
    text += "" if config.token_score == "auto" else f" by {config.token_score}"
    return text + ("" if config.token_output == "copy" else f" {config.token_output}")


def token_variants(combos, tokens) -> list:
    """``--token-keep``: each preset and mode again with each schedule (``tokens``: one dict
    of resolve_config token keywords per schedule)."""
    from .config import distinct_configs, resolve_config

    try:
        return [
            (preset, mode, resolve_config(config, **t))
            for t in tokens
            for preset, mode, config in distinct_configs(combos)
        ]
    except ValueError as exc:
        raise BctError(str(exc)) from None


def run_bench(
    model: str | os.PathLike | None = None,
    *,
    random_bert: str | None = None,
    batches: list[int] = (1, 8),  # type: ignore[assignment]
    seq: int | list[int] = 128,
    threads: int = 2,
    runs: int = 20,
    warmup: int = 3,
    presets: list[str] = DEFAULT_PRESETS,  # type: ignore[assignment]
    modes: list[str] = DEFAULT_MODES,  # type: ignore[assignment]
    block_size: int | None = None,
    peers: bool = True,
    structure: dict | None = None,
    rss: bool = True,
    keep: str | os.PathLike | None = None,
    progress=None,
    tokens: list[dict] = (),  # type: ignore[assignment]
) -> BenchResult:
    """Build, then time every model interleaved, then probe each one's peak RSS. ``seq``: one
    or several sequence lengths (every batch at every length); ``tokens``: token-downsampling
    schedules, one dict of `resolve_config` keywords each (`token_variants`)."""
    import onnxruntime as ort

    from . import peers as peer_mod
    from .bench_util import interleaved_medians
    from .modelio import resolve_model_path

    say = progress or (lambda msg: None)
    if (model is None) == (random_bert is None):
        raise BctError("give a model (file or exported directory) or --random-bert SIZE, not both")
    seqs = [seq] if isinstance(seq, int) else list(seq)
    if runs < 1 or warmup < 0 or threads < 1 or not seqs or min(seqs) < 1:
        raise BctError("--runs and --threads must be >= 1, --seq >= 1")
    if random_bert is not None:
        from .random_bert import random_bert as build_random_bert

        say(f"random-weight BERT {random_bert} (built once, then cached)")
        model = build_random_bert(random_bert)
    src = resolve_model_path(model)
    peer_note = ""
    if peers:
        missing = peer_mod.missing_reason()
        peer_note = missing or peer_mod.versions()
        peers = missing is None
    tmp = None
    if keep:
        workdir = Path(keep)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bctonnx-bench.")
        workdir = Path(tmp.name)
    try:
        records = _build_models(src, workdir, presets, modes, block_size, say, structure, tokens)
        if peers:
            records[2:2] = _build_peers(src, workdir, max(seqs), say)
        vocab = max(vocab_size(src), 101)
        sizes = [(b, n) for n in seqs for b in batches]
        shapes = [f"{b}x{n}" for b, n in sizes]
        cache: dict = {}
        for (batch, n), shape in zip(sizes, shapes, strict=True):
            fns = _runners(records, threads, batch, n, vocab, cache)
            say(f"latency {shape} ({len(fns)} models x {runs} runs)")
            medians = interleaved_medians(fns, runs, warmup=warmup)
            for rec in records:
                if rec.model in medians:
                    rec.latency_ms[shape] = medians[rec.model] * 1e3
        del fns
        cache.clear()  # every session closed before the memory probes
        base = next((r for r in records if r.model == BASELINE and r.status == "ok"), None)
        peer = next(
            (r for r in records if r.model == peer_mod.OPENVINO_INT8 and r.status == "ok"), None
        )
        for rec in records:
            if rec.status != "ok":
                continue
            for ref, attr in ((base, "vs_baseline"), (peer, "vs_peer")):
                if ref is not None:
                    ratios = {
                        s: rec.latency_ms[s] / ref.latency_ms[s]
                        for s in shapes
                        if s in rec.latency_ms and s in ref.latency_ms
                    }
                    setattr(rec, attr, ratios)
        rss_base = None
        if rss:
            say("peak RSS (one process per model)")
            try:
                rss_base = peak_rss(None, 1, max(seqs), threads)
            except Exception:  # noqa: BLE001 - the baseline is informative only
                rss_base = None
            for rec in records:
                if rec.status != "ok":
                    continue
                try:
                    rt = "ov" if rec.kind == "peer" else "ort"
                    rec.peak_rss_bytes = peak_rss(
                        rec.path, max(batches), max(seqs), threads, runtime=rt
                    )
                except Exception as exc:  # noqa: BLE001
                    rec.error = str(exc)
        return BenchResult(
            model=str(src),
            shapes=shapes,
            threads=threads,
            runs=runs,
            onnxruntime=ort.__version__,
            cpu=cpu_name(),
            rss_baseline_bytes=rss_base,
            records=records,
            cpu_isa=cpu_isa_summary(),
            bct_isa=bct_kernel_isa(),
            peers=peer_note,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()


# ---------------------------------------------------------------------------------------------
# Output


def format_table(result: BenchResult) -> str:
    lines = [
        f"{result.model}: {result.threads} threads, median of {result.runs} interleaved runs, "
        f"onnxruntime {result.onnxruntime}, {result.cpu} ({result.cpu_isa}; bctonnx kernels: "
        f"{result.bct_isa})",
    ]
    if result.peers:
        lines.append(f"peers: {result.peers}")
    lines.append("")
    has_peer = any(r.vs_peer for r in result.records)
    head = f"{'model':<22} {'size MB':>8} {'ratio':>6} {'peak RSS MB':>11}"
    for s in result.shapes:
        head += f" {s + ' ms':>11} {'vs int8':>7}" + (f" {'vs OV int8':>10}" if has_peer else "")
    lines.append(head)
    failures = []
    for r in result.records:
        if r.status != "ok":
            lines.append(f"{r.model:<22} failed")
            failures.append(f"{r.model}: {r.error}")
            continue
        rss = f"{r.peak_rss_bytes / 2**20:.0f}" if r.peak_rss_bytes else "-"
        row = f"{r.model:<22} {r.bytes / 1e6:>8.1f} {r.ratio:>5.2f}x {rss:>11}"
        for s in result.shapes:
            ms = r.latency_ms.get(s)
            vs = r.vs_baseline.get(s)
            row += f" {ms:>11.2f}" if ms is not None else f" {'-':>11}"
            row += f" {vs:>6.2f}x" if vs is not None else f" {'-':>7}"
            if has_peer:
                vp = r.vs_peer.get(s)
                row += f" {vp:>9.2f}x" if vp is not None else f" {'-':>10}"
        lines.append(row)
    if result.rss_baseline_bytes:
        lines += [
            "",
            f"peak RSS includes {result.rss_baseline_bytes / 2**20:.0f} MB of interpreter + "
            "onnxruntime (the same probe without a model)",
        ]
    lines += [f"failed: {f}" for f in failures]
    return "\n".join(lines)


def write_plot(result: BenchResult, path: str | os.PathLike) -> str | None:
    """Size vs latency scatter (one panel per shape). Returns None when written, else the
    reason it was skipped (matplotlib not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    ok = [r for r in result.records if r.status == "ok" and r.latency_ms]
    fig, axes = plt.subplots(
        1, len(result.shapes), figsize=(5.5 * len(result.shapes), 4.2), squeeze=False
    )
    for ax, shape in zip(axes[0], result.shapes, strict=True):
        for r in ok:
            if shape not in r.latency_ms:
                continue
            marker = {"fp32": "s", "baseline": "^"}.get(r.kind, "o")
            ax.scatter(r.bytes / 1e6, r.latency_ms[shape], marker=marker, s=50)
            ax.annotate(r.model, (r.bytes / 1e6, r.latency_ms[shape]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel("latency (ms, median)")
        ax.set_title(f"batch x seq {shape}, {result.threads} threads")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_json(result: BenchResult, path: str | os.PathLike) -> None:
    text = json.dumps(result.to_dict(), indent=2) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text)


if __name__ == "__main__":  # python -m bctonnx.bench --rss-probe PATH BATCH SEQ THREADS
    if len(sys.argv) == 7 and sys.argv[1] == "--rss-probe":
        _, _, model_path, b, s, t, rt = sys.argv
        print(_rss_probe(model_path or None, int(b), int(s), int(t), rt))
    else:
        sys.exit("usage: python -m bctonnx.bench --rss-probe PATH BATCH SEQ THREADS {ort,ov}")
