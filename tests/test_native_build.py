"""The op library's build hygiene: it compiles with -Wall -Wextra and no warning, and the test
suite passes against a separate AddressSanitizer + UndefinedBehaviorSanitizer build of it.

The sanitizer run is a child pytest over the tests that load the library, with the sanitizer
runtimes preloaded (python itself is not instrumented), the sanitized build selected through
``BCTONNX_OP_LIBRARY``, leak checking off (the interpreter's own allocations are not ours) and
every report fatal. Both builds compile concurrently (about 35 s each on one core).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bctonnx.ops import build_support

TESTS = Path(__file__).resolve().parent
CHILD_ENV = "BCTONNX_SANITIZER_CHILD"
# the tests that run the native kernels (the other modules test Python only or reuse these)
SANITIZED_TESTS = [
    "test_oplib.py",
    "test_ops_nonlinear.py",
    "test_matmul.py",
    "test_attention_pv.py",
    "test_block_attention.py",
    "test_integer.py",
    "test_bench.py",
    "test_fuzz_ops.py",  # malformed graphs and feeds: every op, BlockAttention included
    # token dropping's ops: the kernels on every ISA, malformed inputs
    "test_token_ops.py::test_kernels_equal_the_reference",
    "test_token_ops.py::test_malformed_inputs_are_refused",
    "test_token_ops.py::test_norm_shape_is_checked",
]
SANITIZE = "-fsanitize=address,undefined"

pytestmark = pytest.mark.skipif(
    os.environ.get(CHILD_ENV) == "1", reason="inside the sanitizer run itself"
)


def _runtime(name: str) -> str:
    cxx = os.environ.get("CXX") or "g++"
    path = subprocess.run(
        [cxx, f"-print-file-name={name}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(path) or not os.path.isfile(path):
        pytest.fail(f"{cxx} has no {name} (install the compiler's sanitizer runtimes)")
    return path


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Both builds, compiled at the same time: name -> (library, finished compiler process)."""
    out = tmp_path_factory.mktemp("native")
    include = build_support.find_ort_include_dir(log=lambda _: None)
    srcs = build_support.sources()
    env = dict(os.environ)
    flags = {
        "werror": ("-Werror", ""),
        "sanitized": (
            f"{SANITIZE} -fno-sanitize-recover=all -fno-omit-frame-pointer -O1 -g",
            SANITIZE,
        ),
    }
    procs = {}
    for name, (cxxflags, ldflags) in flags.items():
        lib = out / name / build_support.LIBRARY_NAME
        lib.parent.mkdir()
        env.update(CXXFLAGS=cxxflags, LDFLAGS=ldflags)
        cmd = build_support.compile_command(srcs, lib, include, env)
        procs[name] = (lib, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True))
    done = {}
    for name, (lib, proc) in procs.items():
        _, err = proc.communicate()
        done[name] = (lib, subprocess.CompletedProcess(proc.args, proc.returncode, "", err))
    return done


def test_library_compiles_with_wall_wextra_and_no_warning(builds):
    lib, proc = builds["werror"]
    assert "-Wall" in proc.args and "-Wextra" in proc.args and "-Werror" in proc.args
    assert proc.returncode == 0 and lib.is_file(), proc.stderr[-4000:]
    assert "warning" not in proc.stderr, proc.stderr[-4000:]


def test_kernel_tests_pass_under_address_and_undefined_behaviour_sanitizers(builds):
    lib, proc = builds["sanitized"]
    assert proc.returncode == 0 and lib.is_file(), proc.stderr[-4000:]
    env = dict(os.environ)
    env.update(
        {
            CHILD_ENV: "1",
            "BCTONNX_OP_LIBRARY": str(lib),
            "LD_PRELOAD": " ".join([_runtime("libasan.so"), _runtime("libubsan.so")]),
            "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0",
            "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        }
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]
    cmd += [str(TESTS / t) for t in SANITIZED_TESTS]
    child = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True)
    report = (child.stdout[-3000:] + "\n" + child.stderr[-6000:]).strip()
    assert child.returncode == 0, report
    summary = child.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, report
