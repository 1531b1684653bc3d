"""The binary wheel (README "Wheels"): built by the README's command from a copy of the source
tree, repaired by auditwheel (a manylinux tag), installed into a fresh virtualenv whose PATH
has no C++ compiler (``CXX=/bin/false``), where ``bctonnx demo`` runs on the wheel's own op
library."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import readme_blocks, scripts_env

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def copy_sources(dst: Path) -> Path:
    """The files a checkout has (tracked, or new and not ignored): no build products, no
    venv, no in-place op library."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout  # fmt: skip
    for name in filter(None, listed.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def wheels_command() -> str:
    """README "Wheels"'s build command (its one bash block, lines joined)."""
    section = "The op library"
    blocks = [code for lang, code in readme_blocks(section) if "pip wheel" in code]
    assert len(blocks) == 1, blocks
    return blocks[0].replace("\\\n", " ").strip()


def test_wheel_builds_is_manylinux_and_runs_the_demo_without_a_compiler(minilm_workdir, tmp_path):
    if shutil.which(os.environ.get("CXX") or "g++") is None:
        pytest.skip("building the wheel needs the C++ compiler (this test then hides it)")
    src = copy_sources(tmp_path / "src")
    bindir = str(Path(sys.executable).parent)
    build_env = scripts_env()
    proc = subprocess.run(
        wheels_command(), shell=True, cwd=src, env=build_env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (src / "wheelhouse").glob("*.whl")
    # one wheel for every Python 3 on manylinux (glibc) x86-64, with the library inside
    tags = re.fullmatch(r"bctonnx-[^-]+-py3-none-(manylinux_(\d+)_(\d+)_x86_64)\.whl", wheel.name)
    assert tags, wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        wheel_meta = zf.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    assert "bctonnx/ops/libbctonnx_ops.so" in names
    assert "bctonnx/integrations/olive/olive_config.json" in names
    assert f"Tag: py3-none-{tags.group(1)}" in wheel_meta and "Root-Is-Purelib: false" in wheel_meta
    show = subprocess.run(
        [str(Path(bindir) / "auditwheel"), "show", str(wheel)], capture_output=True, text=True
    )
    assert f'"{tags.group(1)}"' in " ".join(show.stdout.split()), show.stdout

    # a fresh virtualenv; the third-party dependencies (torch, transformers, ...) are this
    # environment's, seen through a .pth file (installing them again takes minutes and
    # compiles nothing either); bctonnx itself comes only from the wheel
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(fresh)], check=True)
    fresh_python = fresh / "bin" / "python"
    site = subprocess.run(
        [fresh_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "borrowed_dependencies.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    no_compiler = {
        "PATH": str(fresh / "bin"),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "CXX": "/bin/false",
        "CC": "/bin/false",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "TMPDIR"):
        if key in os.environ:
            no_compiler[key] = os.environ[key]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(args), cwd=tmp_path, env=no_compiler, capture_output=True, text=True, timeout=900
        )

    # --ignore-installed: the borrowed environment has bctonnx too (CI installs it there, not
    # editable); pip must neither take it for this wheel nor try to uninstall it
    installed = run(
        str(fresh_python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
        str(wheel),
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    where = run(
        str(fresh_python),
        "-c",
        "import shutil, bctonnx; print(bctonnx.__file__); print(bctonnx.op_library_path()); "
        "print([shutil.which(c) for c in ('g++', 'c++', 'cc', 'gcc')])",
    )
    assert where.returncode == 0, where.stderr[-3000:]
    module, library, compilers = where.stdout.splitlines()
    assert module.startswith(site) and library.startswith(site), where.stdout
    assert compilers == "[None, None, None, None]"

    # the demo, on the exported MiniLM the fixture made (its work folder's layout)
    work = tmp_path / "demo"
    work.mkdir()
    for name in ("hf", "onnx-fp32"):
        (work / name).symlink_to(minilm_workdir / name, target_is_directory=True)
    demo = run(
        str(fresh / "bin" / "bctonnx"), "demo", "--workdir", str(work), "--runs", "2", "--json"
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    rows = {r["model"]: r for r in json.loads(demo.stdout)}
    assert set(rows) == {"fp32", "w8a8", "w8a8-fast", "w4a8", "w8a8 qdq", "w4a8 qdq"}
    assert rows["w8a8"]["cosine"] > 0.99 and rows["w4a8"]["cosine"] > 0.95  # vs FP32
    assert rows["w4a8"]["ratio"] > 7.5
