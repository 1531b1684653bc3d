"""The native op library: header discovery, build wiring, loading, and the quantization ops
bit-exact against their numpy references (bctonnx/ops/ref_quant.py)."""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import bctonnx
from bctonnx import runtime
from bctonnx.errors import BctError
from bctonnx.ops import build_support as bs
from bctonnx.ops.ref_quant import block_quantize, block_requantize, pow2_format

BLOCK_SIZES = (16, 32, 64, 128)
LENGTHS = (1, 7, 33, 127)

# ------------------------------------------------------------------------------------------
# Header discovery (no network: the Debian step is replaced)


def _fake_headers(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for h in bs.REQUIRED_HEADERS:
        (d / h).write_text("// fake\n")
    return d


def _no_fetch(dest: Path) -> Path:
    raise AssertionError("the Debian route must not run here")


def test_env_override_wins_over_system_and_cache(tmp_path):
    env_dir = _fake_headers(tmp_path / "env")
    system = _fake_headers(tmp_path / "system")
    _fake_headers(tmp_path / "xdg" / "bctonnx" / f"ort-headers-{bs.ORT_HEADERS_VERSION}")
    env = {"ORT_INCLUDE_DIR": str(env_dir), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert bs.find_ort_include_dir(env, [str(system)], fetch=_no_fetch) == env_dir


def test_env_override_may_name_the_parent_of_onnxruntime(tmp_path):
    inner = _fake_headers(tmp_path / "include" / "onnxruntime")
    env = {"ORT_INCLUDE_DIR": str(tmp_path / "include")}
    assert bs.find_ort_include_dir(env, [], fetch=_no_fetch) == inner


def test_bogus_env_override_is_a_clear_error_without_fallback(tmp_path):
    system = _fake_headers(tmp_path / "system")
    (tmp_path / "bogus").mkdir()
    (tmp_path / "bogus" / "onnxruntime_c_api.h").write_text("// lite header missing\n")
    env = {"ORT_INCLUDE_DIR": str(tmp_path / "bogus")}
    with pytest.raises(bs.HeaderDiscoveryError, match="ORT_INCLUDE_DIR=.*bogus.*release archive"):
        bs.find_ort_include_dir(env, [str(system)], fetch=_no_fetch)


def test_system_dirs_then_cache_then_debian(tmp_path):
    system = _fake_headers(tmp_path / "system")
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert (
        bs.find_ort_include_dir(env, [str(tmp_path / "none"), str(system)], fetch=_no_fetch)
        == system
    )

    cache = _fake_headers(tmp_path / "xdg" / "bctonnx" / f"ort-headers-{bs.ORT_HEADERS_VERSION}")
    assert bs.cache_dir(env) == cache
    assert bs.find_ort_include_dir(env, [str(tmp_path / "none")], fetch=_no_fetch) == cache


def test_debian_route_fills_the_cache(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    calls = []

    def fetch(dest: Path) -> Path:
        calls.append(dest)
        return _fake_headers(dest)

    found = bs.find_ort_include_dir(env, [], fetch=fetch)
    assert calls == [bs.cache_dir(env)] and found == bs.cache_dir(env)
    # second time: a cache hit, no fetch
    assert bs.find_ort_include_dir(env, [], fetch=_no_fetch) == found


def test_nothing_found_says_what_was_tried_and_what_to_set(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}

    def fetch(dest: Path) -> Path:
        raise RuntimeError("apt-get update failed: no network")

    with pytest.raises(bs.HeaderDiscoveryError) as err:
        bs.find_ort_include_dir(env, [str(tmp_path / "sys")], fetch=fetch)
    msg = str(err.value)
    assert "\n" not in msg
    for part in (
        "ORT_INCLUDE_DIR (not set)",
        str(tmp_path / "sys"),
        "cache",
        "no network",
        "Set ORT_INCLUDE_DIR",
    ):
        assert part in msg


def test_compile_command_is_portable_and_respects_cxx(tmp_path):
    env = {"CXX": "ccache g++-12", "CXXFLAGS": "-g"}
    cmd = bs.compile_command([tmp_path / "a.cc"], tmp_path / "lib.so", tmp_path / "inc", env)
    assert cmd[:2] == ["ccache", "g++-12"]
    for flag in ("-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-shared", "-g"):
        assert flag in cmd
    assert not [f for f in cmd if f.startswith("-march")]
    assert bs.compile_command([], "x.so", "inc", {})[0] == "g++"


def test_build_support_imports_without_numpy_or_onnxruntime():
    # it runs in pip's isolated build environment, where neither is installed
    code = (
        "import sys, importlib.util\n"
        "for m in ('numpy', 'onnxruntime', 'onnx', 'bctonnx'): sys.modules[m] = None\n"
        f"spec = importlib.util.spec_from_file_location('bs', {bs.__file__!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "print(mod.LIBRARY_NAME)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == bs.LIBRARY_NAME


# ------------------------------------------------------------------------------------------
# The built library and the runtime wiring


def _model(nodes, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("bctonnx", 1)],
        ir_version=10,
    )


def _vi(name: str, elem: int):
    return helper.make_tensor_value_info(name, elem, None)


def _quantize_model(block_size: int, bits: int) -> onnx.ModelProto:
    node = helper.make_node(
        "BlockQuantize", ["x"], ["y", "y_scale"], domain="bctonnx", block_size=block_size, bits=bits
    )
    return _model(
        [node],
        [_vi("x", TensorProto.FLOAT)],
        [_vi("y", TensorProto.INT8), _vi("y_scale", TensorProto.FLOAT)],
    )


def _requantize_model(elem: int, in_block_size: int, block_size: int, bits: int) -> onnx.ModelProto:
    node = helper.make_node(
        "BlockRequantize",
        ["x", "x_scale"],
        ["y", "y_scale"],
        domain="bctonnx",
        in_block_size=in_block_size,
        block_size=block_size,
        bits=bits,
    )
    return _model(
        [node],
        [_vi("x", elem), _vi("x_scale", TensorProto.FLOAT)],
        [_vi("y", TensorProto.INT8), _vi("y_scale", TensorProto.FLOAT)],
    )


def test_library_is_built_absolute_and_loads():
    path = bctonnx.op_library_path()
    assert path is not None, "op library not built: pip install . (or pip install -e .)"
    assert os.path.isabs(path) and os.path.isfile(path)
    assert Path(path).name == bs.LIBRARY_NAME
    assert runtime.require_op_library() == path
    lib = ctypes.CDLL(path)
    assert hasattr(lib, "RegisterCustomOps")
    assert not hasattr(lib, "_ZN3bct11AddQuantOpsERN3Ort14CustomOpDomainE")  # hidden visibility
    sess = ort.InferenceSession(
        _quantize_model(16, 8).SerializeToString(),
        bctonnx.session_options(threads=1),
        providers=["CPUExecutionProvider"],
    )
    y, s = sess.run(None, {"x": np.array([[1.0, -2.0, 0.5]], np.float32)})
    assert y.tolist() == [[32, -64, 16]] and s.tolist() == [[2.0**-5]]  # 2/127 > 2**-6


def test_make_session_runs_a_bctonnx_model(tmp_path):
    path = tmp_path / "q.onnx"
    onnx.save(_quantize_model(32, 8), path)
    for model in (path, path.read_bytes()):
        sess = runtime.make_session(model, threads=1)
        assert [o.name for o in sess.get_outputs()] == ["y", "y_scale"]


def test_without_the_library_a_bctonnx_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "op_library_path", lambda: None)
    path = tmp_path / "q.onnx"
    onnx.save(_quantize_model(32, 8), path)
    for model in (path, str(path), path.read_bytes()):
        with pytest.raises(BctError, match=r"op library.*pip install \.") as err:
            runtime.make_session(model)
        assert "\n" not in str(err.value)
    with pytest.raises(BctError, match=r"not built: rebuild it with `pip install \.`"):
        runtime.require_op_library()
    # a standard-domain model does not need the library
    plain = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [_vi("x", TensorProto.FLOAT)],
            [_vi("y", TensorProto.FLOAT)],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
        ir_version=10,
    )
    sess = runtime.make_session(plain.SerializeToString())
    assert sess.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0].tolist() == [0.0, 2.0]


# ------------------------------------------------------------------------------------------
# Ops vs references


@functools.cache
def _session(kind: str, *attrs) -> ort.InferenceSession:
    if bctonnx.op_library_path() is None:
        pytest.fail("op library not built: pip install . (or pip install -e .)")
    model = _quantize_model(*attrs) if kind == "q" else _requantize_model(*attrs)
    return ort.InferenceSession(
        model.SerializeToString(),
        bctonnx.session_options(threads=1),
        providers=["CPUExecutionProvider"],
    )


def run_quantize(x: np.ndarray, block_size: int, bits: int = 8):
    return _session("q", block_size, bits).run(None, {"x": x})


def run_requantize(x, x_scale, in_block_size: int, block_size: int, bits: int = 8):
    elem = TensorProto.INT32 if x.dtype == np.int32 else TensorProto.INT8
    sess = _session("r", elem, in_block_size, block_size, bits)
    return sess.run(None, {"x": x, "x_scale": np.asarray(x_scale, np.float32)})


def assert_bit_exact(got, want):
    (y, s), (ry, rs) = got, want
    assert y.dtype == np.int8 and s.dtype == np.float32
    assert y.shape == ry.shape and s.shape == rs.shape
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(s.view(np.uint32), rs.view(np.uint32))


def _float_rows(rng, shape) -> np.ndarray:
    """Rows of very different magnitudes (scales from 2**-140 to 2**100), with ties."""
    x = rng.standard_normal(shape).astype(np.float64)
    mag = np.exp2(rng.uniform(-140, 100, size=shape[:-1] + (1,)))
    x = x * mag
    # exact halfway values on a pow2 grid: round-half-even is exercised
    ties = rng.random(shape) < 0.1
    grid = np.exp2(np.floor(np.log2(np.abs(x) + 1e-300)) - 5)
    x = np.where(ties, (np.round(x / grid) + 0.5) * grid, x)
    return x.astype(np.float32)


SHAPES = (
    [(n,) for n in LENGTHS]
    + [(3, n) for n in LENGTHS]
    + [(2, 3, 33), (2, 2, 3, 127), (4, 128), (2, 1, 256)]
)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_block_quantize_random_matches_reference(block_size):
    rng = np.random.default_rng(block_size)
    for shape in SHAPES:
        for bits in (8, 4, 2):
            x = _float_rows(rng, shape)
            assert_bit_exact(run_quantize(x, block_size, bits), block_quantize(x, block_size, bits))


def test_block_quantize_is_bit_exact_on_every_instruction_set(monkeypatch):
    # BlockQuantize runs BlockMatMul's row quantizer, chosen like BlockMatMul's kernels: every
    # path this CPU has (scalar and avx2 always, avx512 / amx where present)
    best = ctypes.CDLL(runtime.require_op_library()).bctonnx_block_matmul_isa(b"")
    isas = ["scalar", "avx2", "avx512", "amx"][: best + 1]
    assert len(isas) >= 2
    rng = np.random.default_rng(7)
    for isa in isas:
        monkeypatch.setenv("BCTONNX_ISA", isa)
        for block_size in (1, 16, 32, 33, 128):
            sess = ort.InferenceSession(
                _quantize_model(block_size, 8).SerializeToString(),
                bctonnx.session_options(threads=1),
                providers=["CPUExecutionProvider"],
            )
            for shape in [(3, 37), (2, 4, 128), (1, 300)]:
                x = _float_rows(rng, shape)
                x.reshape(-1)[:3] = [0.0, np.float32(2.0**-149), -np.float32(3.0e38)]
                got = sess.run(None, {"x": x})
                assert_bit_exact(got, block_quantize(x, block_size, 8))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_block_quantize_edge_values(block_size):
    rng = np.random.default_rng(100 + block_size)
    cases = [
        np.full((2, 37), -128.0, np.float32),
        np.full((2, 37), 127.0, np.float32),
        np.zeros((3, 33), np.float32),
        -np.zeros((1, 7), np.float32),
        np.full((1, 5), np.float32(2.0**-149)),  # smallest subnormal
        np.full((1, 9), np.float32(127 * 2.0**-128)),  # around the subnormal scales
        np.array([[np.float32(3.4e38), -np.float32(3.4e38), 1.0]], np.float32),  # near FLT_MAX
    ]
    outlier = rng.standard_normal((2, 3, 127)).astype(np.float32)
    outlier[1, 2, 5] = 1e6  # one huge outlier in a row: its block's others round to 0
    cases.append(outlier)
    tiny = rng.standard_normal((4, 33)).astype(np.float32) * np.float32(2.0**-120)
    cases.append(tiny)
    for x in cases:
        for bits in (8, 5, 3):
            if bits == 3 and np.abs(x).max() > 3 * 2.0**126:
                continue  # scale code 127: test_block_quantize_scale_code_127_is_exact
            assert_bit_exact(run_quantize(x, block_size, bits), block_quantize(x, block_size, bits))


@pytest.mark.parametrize("block_size", [16, 32])
def test_block_quantize_wide_rows_mixed_block_magnitudes(block_size):
    """Rows of 24 blocks (the kernel decides exponents 16 blocks at a time): zero blocks,
    quotients amax / qmax in the subnormal range, the 2**-128 boundary, near FLT_MAX."""
    rng = np.random.default_rng(block_size)
    mags = [0.0, 2.0**-149, 2.0**-140, 127 * 2.0**-128, 2.0**-126, 1e-30, 1.0, 3.0, 1e20, 3.0e38]
    x = rng.standard_normal((5, 24, block_size)).astype(np.float64)
    x /= np.abs(x).max(axis=-1, keepdims=True)
    scale = np.array(mags * 12)[rng.permutation(120)].reshape(5, 24, 1)
    x = (x * scale).astype(np.float32).reshape(5, 24 * block_size)
    x[0, 3 * block_size : 5 * block_size] = 0.0  # two whole zero blocks
    for bits in (8, 5, 3):
        if bits == 3:  # scale code 127 (|x| > 3 * 2**126): test_block_quantize_scale_code_127
            x = np.clip(x, -1e38, 1e38)
        assert_bit_exact(run_quantize(x, block_size, bits), block_quantize(x, block_size, bits))
    wide = np.ones((2, 24 * block_size), np.float32)
    wide[1, 20 * block_size] = 3e38  # bits=2: 2**128 needed in block 20 of a wide row
    with pytest.raises(Exception, match="too large"):
        run_quantize(wide, block_size, bits=2)


def test_block_quantize_zero_block_scale_is_subnormal_pow2():
    y, s = run_quantize(np.zeros((2, 20), np.float32), 16)
    assert not y.any() and s.shape == (2, 2)
    assert np.all(s == np.float32(2.0**-128))


def test_block_quantize_subnormal_scale_rounding_follows_blockformat():
    # amax/127 is just above 2**-128 but rounds to it in float32: blockformat keeps 2**-128
    amax = np.float32(127 * 2.0**-128 + 2.0**-145)  # one ulp above 127 * 2**-128
    assert float(amax) > 127 * 2.0**-128
    y, s = run_quantize(np.array([amax, amax / 2], np.float32), 16)
    assert s[0] == np.float32(2.0**-128) and y.tolist() == [127, 64]


def test_block_quantize_scale_code_127_is_exact():
    # bits=3, |x| > 3 * 2**126 needs the scale 2**127; 1.5 * 2**127 is a tie (-> 2)
    x = np.array([1.75 * 2.0**127, 1.5 * 2.0**127, 0.5 * 2.0**127], np.float32)
    y, s = run_quantize(x, 16, bits=3)
    assert s.tolist() == [2.0**127] and y.tolist() == [2, 2, 0]
    fmt = pow2_format(16, 3)
    from bctonnx.blockformat import decode_scales

    if decode_scales(np.int8(127), fmt) == np.float32(2.0**127):
        assert_bit_exact((y, s), block_quantize(x, 16, bits=3))
    else:  # numpy's float32 exp2(127) is one ulp high here: the reference refuses
        with pytest.raises(ValueError, match="exp2"):
            block_quantize(x, 16, bits=3)


def test_block_quantize_errors():
    for bad in (np.nan, np.inf, -np.inf):
        x = np.array([[1.0, bad, 2.0]], np.float32)
        with pytest.raises(ValueError, match="NaN or infinity"):
            block_quantize(x, 16)
        with pytest.raises(Exception, match="NaN or infinity"):
            run_quantize(x, 16)
    for bad in (np.nan, np.inf, -np.inf):  # rows of whole blocks: the kernel's aligned path
        x = np.ones((2, 96), np.float32)
        x[1, 77] = bad
        with pytest.raises(Exception, match="NaN or infinity"):
            run_quantize(x, 32)
    x = np.array([2.0**127, 1.0], np.float32)  # bits=2: qmax=1, needs 2**128
    with pytest.raises(ValueError, match="too large"):
        block_quantize(np.array([3e38], np.float32), 16, bits=2)
    with pytest.raises(Exception, match="too large"):
        run_quantize(np.array([3e38], np.float32), 16, bits=2)
    y, s = run_quantize(x, 16, bits=2)  # exactly 2**127 still fits
    assert s.tolist() == [2.0**127] and y.tolist() == [1, 0]
    with pytest.raises(Exception, match="rank >= 1"):
        run_quantize(np.array(1.0, np.float32), 16)
    y, s = run_quantize(np.zeros((3, 0), np.float32), 16)
    assert y.shape == (3, 0) and s.shape == (3, 0)


def test_block_quantize_attribute_errors():
    node = helper.make_node("BlockQuantize", ["x"], ["y", "s"], domain="bctonnx")
    model = _model(
        [node],
        [_vi("x", TensorProto.FLOAT)],
        [_vi("y", TensorProto.INT8), _vi("s", TensorProto.FLOAT)],
    )
    with pytest.raises(Exception, match="'block_size' is required"):
        ort.InferenceSession(
            model.SerializeToString(), bctonnx.session_options(), providers=["CPUExecutionProvider"]
        )
    with pytest.raises(Exception, match="bits must be in 2..8"):
        _session("q", 16, 9)


# -- BlockRequantize


def _int_rows(rng, shape, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    x = np.empty(shape, np.int64)
    flat = x.reshape(-1, shape[-1])
    for i in range(flat.shape[0]):
        kind = i % 4
        if kind == 0:  # full range
            flat[i] = rng.integers(info.min, info.max, endpoint=True, size=shape[-1])
        elif kind == 1:  # a row of small accumulators
            flat[i] = rng.integers(-300, 301, size=shape[-1])
        elif kind == 2:  # varying magnitude per element
            lim = np.exp2(rng.integers(0, 31 if dtype == np.int32 else 7, size=shape[-1]))
            flat[i] = np.round(rng.uniform(-1, 1, size=shape[-1]) * lim)
        else:  # mostly zeros
            flat[i] = rng.integers(-5, 6, size=shape[-1]) * (rng.random(shape[-1]) < 0.2)
    return np.clip(x, info.min, info.max).astype(dtype)


def _scales(rng, x_shape, in_block_size, lo=-149, hi=90) -> np.ndarray:
    if in_block_size == 0:
        e = rng.integers(lo, hi + 1, size=())
    else:
        nb = -(-x_shape[-1] // in_block_size)
        e = rng.integers(lo, hi + 1, size=x_shape[:-1] + (nb,))
        # neighbouring input blocks close in exponent, so they share output blocks usefully
        e = np.minimum(e, e.reshape(-1, nb)[:, :1].reshape(x_shape[:-1] + (1,)) + 8)
    return np.ldexp(np.float32(1), np.asarray(e, np.int32)).astype(np.float32)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", [np.int32, np.int8])
def test_block_requantize_random_matches_reference(block_size, dtype):
    rng = np.random.default_rng(block_size + (0 if dtype == np.int32 else 1000))
    for shape in SHAPES:
        for in_bs in (0, 8, 16, 32, 128):
            for bits in (8, 4):
                x = _int_rows(rng, shape, dtype)
                s = _scales(rng, shape, in_bs)
                want = block_requantize(x, s, in_bs, block_size, bits)
                assert_bit_exact(run_requantize(x, s, in_bs, block_size, bits), want)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_block_requantize_equals_block_quantize_of_the_real_values(block_size):
    """Where x * x_scale is an exact float32 (|x| < 2**24), requantize == quantize(x * scale):
    integer and float paths agree, subnormal values and scales included."""
    rng = np.random.default_rng(7 * block_size)
    for shape in SHAPES:
        for in_bs in (0, 16, 64):
            for bits in (8, 3):
                x = rng.integers(-(2**24) + 1, 2**24, size=shape).astype(np.int32)
                x = np.right_shift(x, rng.integers(0, 24, size=shape[:-1] + (1,))).astype(np.int32)
                s = _scales(rng, shape, in_bs, lo=-149, hi=100)
                real = x.astype(np.float64) * _expand(s, in_bs, shape[-1])
                assert np.all(real.astype(np.float32).astype(np.float64) == real)  # exact
                want = block_quantize(real.astype(np.float32), block_size, bits)
                assert_bit_exact(block_requantize(x, s, in_bs, block_size, bits), want)
                assert_bit_exact(run_requantize(x, s, in_bs, block_size, bits), want)


def _expand(s, in_bs, depth):
    if in_bs == 0:
        return np.float64(s.reshape(()))
    return np.repeat(s.astype(np.float64), in_bs, axis=-1)[..., :depth]


def test_block_requantize_float32_rounding_of_the_scale_choice():
    # A = (127 * 2**21 + 1) * 2**-149 = 127 * 2**-128 + 2**-149: exact rule says 2**-127, but
    # fl32(A / 127) == 2**-128, which is what BlockQuantize picks; so does BlockRequantize
    v = np.array([[127 * 2**21 + 1, 3]], np.int32)
    s = np.float32(2.0**-149)
    want = block_quantize((v.astype(np.float64) * 2.0**-149).astype(np.float32), 16)
    assert want[1].tolist() == [[np.float32(2.0**-128)]] and want[0].tolist() == [[127, 0]]
    assert_bit_exact(block_requantize(v, s, 0, 16), want)
    assert_bit_exact(run_requantize(v, s, 0, 16), want)
    # a normal scale: one integer above 127 * 2**k does need the next exponent
    v = np.array([[127 * 2**10 + 1]], np.int32)
    y, sc = run_requantize(v, np.float32(1.0), 0, 16)
    assert sc.tolist() == [[2.0**11]] and y.tolist() == [[64]]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_block_requantize_extremes(block_size):
    i32 = np.iinfo(np.int32)
    cases = [
        (np.full((2, 37), i32.min, np.int32), 0),
        (np.full((2, 37), i32.max, np.int32), 0),
        (np.array([[i32.min, i32.max] * 20 + [1, -1, 0]], np.int32), 0),
        (np.full((3, 33), -128, np.int8), 0),
        (np.full((3, 33), 127, np.int8), 0),
        (np.full((2, 40), -128, np.int32), 16),
        (np.full((2, 40), 127, np.int32), 16),
        (np.zeros((2, 3, 33), np.int32), 16),
        (np.zeros((4, 7), np.int8), 0),
    ]
    rng = np.random.default_rng(block_size)
    outlier = rng.integers(-1000, 1000, size=(2, 3, 127)).astype(np.int32)
    outlier[0, 1, 100] = i32.max  # one huge outlier in a row
    cases.append((outlier, 32))
    for x, in_bs in cases:
        for e in (-149, -128, -100, -7, 0, 3, 90):
            s = (
                np.full(x.shape[:-1] + (-(-x.shape[-1] // in_bs),), np.float32(2.0**e))
                if in_bs
                else np.float32(2.0**e)
            )
            for bits in (8, 2):
                want = block_requantize(x, s, in_bs, block_size, bits)
                assert_bit_exact(run_requantize(x, s, in_bs, block_size, bits), want)


@pytest.mark.parametrize("in_bs, block_size", [(32, 128), (16, 64), (16, 16), (32, 96), (8, 32)])
def test_block_requantize_int8_nested_blocks(in_bs, block_size):
    """int8 codes whose input blocks nest in the output blocks (BlockMatMul's re-blocking of
    activations, the kernel's vectorized path): every code at exponents from the subnormal
    range to the top, mixed within a row, partial last blocks, and rows of zeros."""
    rng = np.random.default_rng(in_bs * block_size)
    for depth in (block_size * 3, block_size * 2 + in_bs + 5, 7):
        x = rng.integers(-128, 128, size=(9, depth)).astype(np.int8)
        x[1] = -128
        x[2] = 127
        x[3] = 0
        x[4, ::3] = 0
        x[5] = rng.integers(-3, 4, size=depth)  # small codes: left shifts
        nb = -(-depth // in_bs)
        for lo, hi in ((-149, -120), (-20, 5), (100, 120), (-149, 120)):
            e = rng.integers(lo, hi + 1, size=(9, nb))
            e[6] = lo  # one exponent for the whole row
            e[7, ::2] = hi  # alternating far apart
            s = np.ldexp(np.float32(1), e.astype(np.int32)).astype(np.float32)
            for bits in (8, 5):
                want = block_requantize(x, s, in_bs, block_size, bits)
                assert_bit_exact(run_requantize(x, s, in_bs, block_size, bits), want)
    # -128 at 2**127 needs 2**128: an error, from either path
    x = np.full((2, block_size), -128, np.int8)
    s = np.full((2, block_size // in_bs), np.float32(2.0**127))
    with pytest.raises(ValueError, match="too large"):
        block_requantize(x, s, in_bs, block_size)
    with pytest.raises(Exception, match="too large"):
        run_requantize(x, s, in_bs, block_size)


def test_block_requantize_int32_extremes_exact_codes():
    # int32 min at scale 1: max|v| = 2**31, scale 2**25 (2**31 / 2**25 = 64 <= 127 < 128)
    x = np.array([[np.iinfo(np.int32).min, np.iinfo(np.int32).max, 2**24 + 2**23, 2**24]], np.int32)
    y, s = run_requantize(x, np.float32(1.0), 0, 16)
    assert s.tolist() == [[2.0**25]]
    assert y.tolist() == [[-64, 64, 1, 0]]  # 0.75 -> 1, 0.5 -> 0 (half to even)


def test_block_requantize_errors():
    x = np.ones((2, 40), np.int32)
    for bad_scale in (np.float32(0.3), np.float32(0.0), np.float32(-1.0), np.float32(np.inf)):
        with pytest.raises(ValueError, match="not a power of two"):
            block_requantize(x, bad_scale, 0, 16)
        with pytest.raises(Exception, match="not a power of two"):
            run_requantize(x, bad_scale, 0, 16)
    with pytest.raises(ValueError, match="single x_scale"):
        block_requantize(x, np.ones(2, np.float32), 0, 16)
    with pytest.raises(Exception, match="single x_scale"):
        run_requantize(x, np.ones(2, np.float32), 0, 16)
    with pytest.raises(ValueError, match="does not match"):
        block_requantize(x, np.ones((2, 2), np.float32), 16, 16)
    with pytest.raises(Exception, match="does not match"):
        run_requantize(x, np.ones((2, 2), np.float32), 16, 16)
    big = np.array([[np.iinfo(np.int32).max]], np.int32)  # 2**31 * 2**110 / 127 > 2**127
    with pytest.raises(ValueError, match="too large"):
        block_requantize(big, np.float32(2.0**110), 0, 16)
    with pytest.raises(Exception, match="too large"):
        run_requantize(big, np.float32(2.0**110), 0, 16)
    # zeros never need a scale, whatever the input exponent
    y, s = run_requantize(np.zeros((1, 3), np.int32), np.float32(2.0**127), 0, 16)
    assert not y.any() and s.tolist() == [[np.float32(2.0**-128)]]
    y, s = run_requantize(np.zeros((2, 0), np.int8), np.float32(1.0), 0, 16)
    assert y.shape == (2, 0) and s.shape == (2, 0)


# ------------------------------------------------------------------------------------------
# BlockDequantize


def _one_op_session(node: onnx.NodeProto, types: list[int], threads: int = 1):
    """A session of one bctonnx node (inputs of ``types``, one float output y)."""
    model = _model(
        [node], [_vi(n, t) for n, t in zip(node.input, types, strict=True)],
        [_vi("y", TensorProto.FLOAT)],
    )  # fmt: skip
    return ort.InferenceSession(
        model.SerializeToString(), bctonnx.session_options(threads=threads),
        providers=["CPUExecutionProvider"],
    )  # fmt: skip


def _dequantize_session(block_size: int) -> ort.InferenceSession:
    node = helper.make_node(
        "BlockDequantize", ["x", "x_scale"], ["y"], domain="bctonnx", block_size=block_size
    )
    return _one_op_session(node, [TensorProto.INT8, TensorProto.FLOAT])


@pytest.mark.parametrize(
    ("shape", "block_size"),
    [((2, 5, 384), 32), ((7, 33), 16), ((1, 3, 130), 128), ((4, 1), 1), ((3, 20), 7), ((0, 8), 4)],
)
def test_block_dequantize_matches_reference(shape, block_size):
    from bctonnx.ops.ref_quant import block_dequantize

    rng = np.random.default_rng(sum(shape) + block_size)
    x = rng.integers(-128, 128, shape).astype(np.int8)
    x.reshape(-1)[:1] = -128  # the extremes
    x.reshape(-1)[1:2] = 127
    nb = -(-shape[-1] // block_size)
    # normal and subnormal powers of two (2^-149 .. 2^127 as the ops make them)
    exps = rng.integers(-149, 120, (*shape[:-1], nb))
    scale = np.ldexp(np.float32(1), exps).astype(np.float32)
    want = block_dequantize(x, scale, block_size)
    got = _dequantize_session(block_size).run(None, {"x": x, "x_scale": scale})[0]
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    if x.size:  # and the reference is DequantizeLinear's value
        s = np.repeat(scale, block_size, axis=-1)[..., : shape[-1]]
        np.testing.assert_array_equal(want, (x.astype(np.float64) * s).astype(np.float32))


def test_block_dequantize_of_any_scale_is_dequantize_linear():
    # scales that are not powers of two (embedding tables' pow2/8 codes): one float32 product,
    # the value onnxruntime's DequantizeLinear gives
    from bctonnx.ops.ref_quant import block_dequantize

    rng = np.random.default_rng(9)
    x = rng.integers(-128, 128, (3, 5, 70)).astype(np.int8)
    scale = rng.uniform(1e-4, 3.0, (3, 5, 3)).astype(np.float32)
    want = block_dequantize(x, scale, 32)
    got = _dequantize_session(32).run(None, {"x": x, "x_scale": scale})[0]
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    dq = helper.make_node("DequantizeLinear", ["x", "x_scale"], ["y"], axis=-1, block_size=32)
    model = _model(
        [dq], [_vi("x", TensorProto.INT8), _vi("x_scale", TensorProto.FLOAT)],
        [_vi("y", TensorProto.FLOAT)],
    )  # fmt: skip
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(ref.run(None, {"x": x, "x_scale": scale})[0], want)
    with pytest.raises(Exception, match="x_scale must have shape"):
        _dequantize_session(4).run(None, {"x": x, "x_scale": np.ones((3, 5, 1), np.float32)})


# ------------------------------------------------------------------------------------------
# BlockGather


def _gather_session(
    bits: int,
    block_size: int,
    frac_bits: int,
    with_zp: bool,
    packed=None,
    threads: int = 1,
    ids_type: int = TensorProto.INT64,
):
    """A BlockGather model; ``packed`` (default: bits == 4) declares the table uint8."""
    packed = bits == 4 if packed is None else packed
    table = TensorProto.UINT8 if packed else TensorProto.INT8
    inputs = ["table", "codes", "ids"] + (["zp"] if with_zp else [])
    node = helper.make_node(
        "BlockGather", inputs, ["y"], domain="bctonnx", bits=bits, block_size=block_size,
        frac_bits=frac_bits,
    )  # fmt: skip
    types = [table, TensorProto.INT8, ids_type, table][: len(inputs)]
    return _one_op_session(node, types, threads)


def _gather_tables(bits: int, vocab: int, hidden: int, block: int, with_zp: bool, seed: int):
    """A table as lower_gather stores it (4 bits: packed pairs), every scale code used."""
    from bctonnx.blockformat import pack_int4

    rng = np.random.default_rng(seed)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    codes = rng.integers(lo, hi, (vocab, hidden)).astype(np.int8)
    nb = hidden // block
    scale_codes = rng.integers(-128, 128, (vocab, nb)).astype(np.int8)
    scale_codes.reshape(-1)[:256] = np.arange(-128, 128)[: scale_codes.size]
    feeds = {"codes": scale_codes}
    feeds["table"] = pack_int4(codes).reshape(vocab, -1) if bits == 4 else codes
    zp = None
    if with_zp:
        zp = rng.integers(lo, hi, (vocab, nb)).astype(np.int8)
        feeds["zp"] = zp
        if bits == 4:
            feeds["zp"] = pack_int4(np.pad(zp, [(0, 0), (0, nb % 2)])).reshape(vocab, -1)
    return codes, scale_codes, zp, feeds


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    ("hidden", "block", "frac_bits", "with_zp"),
    [(384, 384, 3, False), (384, 128, 3, True), (96, 32, 0, True), (48, 16, 4, True),
     (20, 4, 1, False), (6, 2, 2, True)],
)  # fmt: skip
def test_block_gather_matches_reference_and_the_dequantized_table(
    bits, hidden, block, frac_bits, with_zp, monkeypatch
):
    """Every scale code of frac_bits 0..4, zero points (4 bits: packed, an odd count of blocks
    too), ids of any shape, negative ids counted from the end as Gather's: bit-exact with the
    reference on every ISA path (1 and 2 threads), and the reference is the table's own
    dequantization (blockformat)."""
    from test_matmul import available_isas

    from bctonnx.blockformat import BlockFormat, decode_scales
    from bctonnx.ops.ref_quant import block_gather

    vocab = 300
    codes, scale_codes, zp, feeds = _gather_tables(bits, vocab, hidden, block, with_zp, hidden)
    rng = np.random.default_rng(block)
    for ids in (rng.integers(-vocab, vocab, (3, 17)), np.arange(vocab), np.zeros((2, 0), int)):
        ids = ids.astype(np.int64 if ids.ndim != 1 else np.int32)  # int32: optimized graphs
        ref_args = dict(bits=bits, block_size=block, frac_bits=frac_bits)
        want = block_gather(feeds["table"], scale_codes, ids, feeds.get("zp"), **ref_args)
        isas = [isa for isa in available_isas() if isa != "amx-emulated"]
        for isa, threads in [(isa, 1) for isa in isas] + [("", 2)]:
            monkeypatch.setenv("BCTONNX_ISA", isa)
            ids_type = TensorProto.INT32 if ids.dtype == np.int32 else TensorProto.INT64
            sess = _gather_session(
                bits, block, frac_bits, with_zp, threads=threads, ids_type=ids_type
            )
            got = sess.run(None, dict(feeds, ids=ids))[0]
            assert got.dtype == np.float32 and got.shape == (*ids.shape, hidden)
            np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32), err_msg=isa)
        if ids.size:  # the dequantized table, rows picked as Gather picks them
            fmt = BlockFormat(bits=8, block_size=block, scale_kind="pow2", frac_bits=frac_bits)
            q = codes.astype(np.int32) - (0 if zp is None else np.repeat(zp, block, axis=1))
            table = q.astype(np.float32) * np.repeat(decode_scales(scale_codes, fmt), block, 1)
            np.testing.assert_array_equal(want, table[ids].astype(np.float32))


def test_block_gather_refuses_what_breaks_its_spec():
    _, scale_codes, _, feeds = _gather_tables(8, 10, 64, 32, False, 0)
    sess = _gather_session(8, 32, 3, False)
    for bad_id in (10, -11):
        with pytest.raises(Exception, match="outside \\[-10, 10\\)"):
            sess.run(None, dict(feeds, ids=np.array([[1, bad_id]], np.int64)))
    with pytest.raises(Exception, match="must divide H = 64"):
        _gather_session(8, 48, 3, False).run(None, dict(feeds, ids=np.zeros(1, np.int64)))
    with pytest.raises(Exception, match="scale codes must be"):
        sess.run(None, dict(feeds, codes=scale_codes[:, :1], ids=np.zeros(1, np.int64)))
    with pytest.raises(Exception, match="table must be int8"):  # a packed table said 8-bit
        _gather_session(8, 32, 3, False, packed=True).run(
            None, dict(feeds, table=feeds["table"].view(np.uint8), ids=np.zeros(1, np.int64))
        )
    from bctonnx.ops.ref_quant import block_gather

    with pytest.raises(ValueError, match="outside"):
        block_gather(feeds["table"], scale_codes, np.array([10]), bits=8, block_size=32)
