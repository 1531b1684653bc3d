"""Build support for bctonnx's native op library (``libbctonnx_ops.so``).

Used by ``setup.py`` inside pip's isolated build environment, so it needs only the standard
library (no numpy, no onnxruntime). It finds the ONNX Runtime C/C++ API headers and compiles
``bctonnx/ops/csrc/**/*.cc`` into one shared library that onnxruntime loads with
``SessionOptions.register_custom_ops_library`` (the library does not link against onnxruntime:
it gets the API table at registration, so headers are all it needs).

Header discovery, first hit wins (`find_ort_include_dir`); a usable directory holds all of
`REQUIRED_HEADERS`:

1. ``$ORT_INCLUDE_DIR``: a directory containing ``onnxruntime_c_api.h``, or its parent with an
   ``onnxruntime/`` subdirectory (e.g. the ``include/`` of an extracted ONNX Runtime release
   archive). When set, it is the only place looked at: a wrong value is an error, not a
   silent fallback.
2. System headers: ``/usr/include/onnxruntime``, ``/usr/local/include/onnxruntime``.
3. The user cache: ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/bctonnx/ort-headers-1.21.0``.
4. The Debian route (Debian-like machines with ``apt-get`` and ``dpkg``, nothing installed
   system-wide): a private sources list for Debian trixie (``signed-by`` the Debian archive
   keyring), ``apt-get update`` and ``apt-get download libonnxruntime-dev`` with apt's lists
   and cache in a temporary directory, ``dpkg -x`` of the package, and its
   ``usr/include/onnxruntime`` copied into the cache of step 3 (so it runs once per user).

If none works, `HeaderDiscoveryError` says what was tried and to set ``ORT_INCLUDE_DIR``.
The headers are ONNX Runtime 1.21's (API version 21); onnxruntime 1.21 and later load the
library (the C API is backward compatible).

Compilation (`compile_library`): ``$CXX`` (default ``g++``) with
``-O3 -std=c++17 -fPIC -fvisibility=hidden -Wall -Wextra -shared`` plus ``$CXXFLAGS`` / ``$LDFLAGS``; no
``-march=native``, the library is portable across x86-64 (or aarch64) machines.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

LIBRARY_NAME = "libbctonnx_ops.so"
ORT_HEADERS_VERSION = "1.21.0"
REQUIRED_HEADERS = (
    "onnxruntime_c_api.h",
    "onnxruntime_cxx_api.h",
    "onnxruntime_cxx_inline.h",
    "onnxruntime_float16.h",
    "onnxruntime_lite_custom_op.h",
)
SYSTEM_DIRS = ("/usr/include/onnxruntime", "/usr/local/include/onnxruntime")
DEBIAN_SUITE = "trixie"
DEBIAN_PACKAGE = "libonnxruntime-dev"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
CXX_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra")
LINK_FLAGS = ("-shared", "-pthread", "-Wl,--no-undefined")

CSRC_DIR = Path(__file__).resolve().parent / "csrc"


class HeaderDiscoveryError(RuntimeError):
    """No ONNX Runtime headers were found; the message lists what was tried."""


class BuildError(RuntimeError):
    """The compiler failed; the message has its command line and output."""


def _usable(directory: Path) -> Path | None:
    """``directory`` itself or its ``onnxruntime/`` child, if it holds every required header."""
    for candidate in (directory, directory / "onnxruntime"):
        if all((candidate / h).is_file() for h in REQUIRED_HEADERS):
            return candidate
    return None


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where fetched headers are kept: ``$XDG_CACHE_HOME`` or ``~/.cache``, then
    ``bctonnx/ort-headers-<version>``."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bctonnx" / f"ort-headers-{ORT_HEADERS_VERSION}"


def fetch_debian_headers(
    dest: Path, log: Callable[[str], None] = print, timeout: float = 300
) -> Path:
    """The Debian route: download ``libonnxruntime-dev`` from trixie with a private apt state
    and copy its headers to ``dest`` (atomically: ``dest`` appears complete or not at all).
    Returns ``dest``; raises RuntimeError with the reason on any failure."""
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg")
    if not apt or not dpkg:
        raise RuntimeError("apt-get/dpkg not found (not a Debian-like machine)")
    if not Path(DEBIAN_KEYRING).is_file():
        raise RuntimeError(f"{DEBIAN_KEYRING} missing (package debian-archive-keyring)")
    with tempfile.TemporaryDirectory(prefix="bctonnx-ort-headers-") as tmp:
        t = Path(tmp)
        sources = t / "sources.list"
        sources.write_text(
            f"deb [signed-by={DEBIAN_KEYRING}] http://deb.debian.org/debian {DEBIAN_SUITE} main\n"
        )
        for d in ("lists/partial", "cache/archives/partial"):
            (t / d).mkdir(parents=True)
        opts = [
            f"-oDir::Etc::SourceList={sources}",
            "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State::Lists={t / 'lists'}",
            f"-oDir::Cache={t / 'cache'}",
            "-oDebug::NoLocking=1",
            "-qq",
        ]
        if os.geteuid() == 0:  # the private dirs are not the _apt user's: no sandbox warning
            opts.append("-oAPT::Sandbox::User=root")
        for args in (["update"], ["download", DEBIAN_PACKAGE]):
            log(f"bctonnx: apt-get {' '.join(args)} ({DEBIAN_SUITE}, private apt state in {t})")
            proc = subprocess.run(
                [apt, *opts, *args], cwd=t, capture_output=True, text=True, timeout=timeout
            )
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise RuntimeError(f"apt-get {args[0]} failed: {' | '.join(tail)}")
        debs = sorted(t.glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download left no {DEBIAN_PACKAGE}_*.deb")
        root = t / "root"
        proc = subprocess.run(
            [dpkg, "-x", str(debs[0]), str(root)], capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"dpkg -x failed: {proc.stderr.strip()}")
        headers = _usable(root / "usr" / "include" / "onnxruntime")
        if headers is None:
            raise RuntimeError(f"{debs[0].name} has no usable usr/include/onnxruntime")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        try:
            shutil.copytree(headers, staging, dirs_exist_ok=True)
            (staging / "SOURCE").write_text(f"{debs[0].name} (Debian {DEBIAN_SUITE})\n")
            if dest.exists():  # another build won the race; theirs is as good
                shutil.rmtree(staging)
            else:
                staging.rename(dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return dest


def find_ort_include_dir(
    env: Mapping[str, str] | None = None,
    system_dirs: Iterable[str] = SYSTEM_DIRS,
    fetch: Callable[[Path], Path] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """The ONNX Runtime include directory, by the order in the module docstring.

    ``fetch`` replaces the Debian route (tests); ``env`` replaces ``os.environ``.
    """
    env = os.environ if env is None else env
    tried: list[str] = []

    override = env.get("ORT_INCLUDE_DIR")
    if override:
        found = _usable(Path(override).expanduser())
        if found is not None:
            return found
        raise HeaderDiscoveryError(
            f"ORT_INCLUDE_DIR={override} does not contain the ONNX Runtime headers "
            f"({', '.join(REQUIRED_HEADERS)}), neither directly nor in an onnxruntime/ "
            "subdirectory. Point it at the include/ directory of an extracted ONNX Runtime "
            "release archive (>= 1.21), or unset it to let the build find or fetch them."
        )
    tried.append("ORT_INCLUDE_DIR (not set)")

    for d in system_dirs:
        found = _usable(Path(d))
        if found is not None:
            return found
        tried.append(d)

    cache = cache_dir(env)
    found = _usable(cache)
    if found is not None:
        return found
    tried.append(f"{cache} (cache)")

    fetch = fetch or (lambda dest: fetch_debian_headers(dest, log=log))
    try:
        found = _usable(fetch(cache))
        if found is not None:
            return found
        tried.append(f"Debian {DEBIAN_SUITE} {DEBIAN_PACKAGE}: no usable headers")
    except Exception as e:  # noqa: BLE001 - every failure becomes part of the one message
        tried.append(f"Debian {DEBIAN_SUITE} {DEBIAN_PACKAGE}: {e}")

    raise HeaderDiscoveryError(
        "cannot build bctonnx's op library: ONNX Runtime C/C++ headers not found. Tried: "
        + "; ".join(tried)
        + ". Set ORT_INCLUDE_DIR to a directory holding onnxruntime_c_api.h and "
        "onnxruntime_lite_custom_op.h (e.g. the include/ directory of an extracted ONNX Runtime "
        "release archive, version >= 1.21) and reinstall."
    )


def sources(csrc: Path = CSRC_DIR) -> list[Path]:
    """Every ``.cc`` under ``csrc`` (one folder per op family, e.g. ``matmul/``)."""
    return sorted(csrc.rglob("*.cc"))


def dependencies(csrc: Path = CSRC_DIR) -> list[Path]:
    return sorted([*csrc.rglob("*.cc"), *csrc.rglob("*.h")])


def compile_command(
    srcs: Iterable[Path | str],
    output: Path | str,
    include_dir: Path | str,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    env = os.environ if env is None else env
    cxx = shlex.split(env.get("CXX") or "g++")
    return [
        *cxx,
        *CXX_FLAGS,
        *shlex.split(env.get("CXXFLAGS", "")),
        f"-I{include_dir}",
        *map(str, srcs),
        *LINK_FLAGS,
        *shlex.split(env.get("LDFLAGS", "")),
        "-o",
        str(output),
    ]


def up_to_date(output: Path, deps: Iterable[Path]) -> bool:
    if not output.is_file():
        return False
    mtime = output.stat().st_mtime
    return all(d.stat().st_mtime <= mtime for d in deps)


def compile_library(
    output: Path | str,
    csrc: Path = CSRC_DIR,
    include_dir: Path | str | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    jobs: int | None = None,
) -> Path:
    """Compile ``csrc/**/*.cc`` into ``output`` (skipped when it is newer than every source and
    header, unless ``force``): one compiler process per source, ``jobs`` at a time (default:
    the CPU count), then one link. Writes to a temporary file first, so a failed build never
    leaves a broken library behind."""
    output = Path(output)
    if not force and up_to_date(output, dependencies(csrc)):
        log(f"bctonnx: {output} is up to date")
        return output
    include = Path(include_dir) if include_dir else find_ort_include_dir(log=log)
    srcs = sources(csrc)
    if not srcs:
        raise BuildError(f"no C++ sources in {csrc}")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    env = os.environ
    cxx = shlex.split(env.get("CXX") or "g++")
    cflags = [*CXX_FLAGS, *shlex.split(env.get("CXXFLAGS", "")), f"-I{include}"]
    with tempfile.TemporaryDirectory(prefix="bctonnx-build.") as objdir:
        objects = [Path(objdir) / f"{i:03d}_{src.stem}.o" for i, src in enumerate(srcs)]
        commands = [
            [*cxx, *cflags, "-c", str(src), "-o", str(obj)]
            for src, obj in zip(srcs, objects, strict=True)
        ]
        log(f"bctonnx: compiling {len(srcs)} sources: {shlex.join(commands[0][:-4])} ...")
        _run_all(commands, jobs or os.cpu_count() or 1)
        link = [*cxx, *map(str, objects), *LINK_FLAGS, *shlex.split(env.get("LDFLAGS", ""))]
        link += ["-o", str(tmp)]
        _run_all([link], 1)
    os.replace(tmp, output)
    return output


def _run_all(commands: list[list[str]], jobs: int) -> None:
    """Run the commands, ``jobs`` at a time; the first failure raises `BuildError` with its
    command and the end of its error output."""
    pending, running = list(commands), []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                cmd = pending.pop(0)
                try:
                    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
                except FileNotFoundError as e:
                    raise BuildError(
                        f"C++ compiler not found ({cmd[0]}): install g++ or set CXX"
                    ) from e
                running.append((cmd, proc))
            cmd, proc = running.pop(0)
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise BuildError(
                    f"compiling bctonnx's op library failed:\n{shlex.join(cmd)}\n{err[-8000:]}"
                )
    finally:
        for _, proc in running:
            proc.kill()
            proc.wait()


if __name__ == "__main__":  # python bctonnx/ops/build_support.py [OUTPUT]: build in place
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else CSRC_DIR.parent / LIBRARY_NAME
    print(compile_library(target, force=True))
