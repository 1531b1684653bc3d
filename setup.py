"""Builds bctonnx's native op library; all other metadata lives in pyproject.toml.

The "extension" ``bctonnx.ops.libbctonnx_ops`` is not a Python module: it is a plain shared
library (``bctonnx/ops/libbctonnx_ops.so``, no ``PyInit``) that onnxruntime loads. The custom
``build_ext`` fixes its file name and compiles it with `bctonnx/ops/build_support.py` (header
discovery, flags, ``$CXX``). ``pip install .`` ships it in the wheel; ``pip install -e .``
builds it in place next to the sources.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
CSRC = "bctonnx/ops/csrc"
EXT_NAME = "bctonnx.ops.libbctonnx_ops"


def _load_build_support():
    # By file path: importing the bctonnx package would need numpy/onnx in the build env.
    path = HERE / "bctonnx" / "ops" / "build_support.py"
    spec = importlib.util.spec_from_file_location("_bctonnx_build_support", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bs = _load_build_support()


class BuildOpLibrary(build_ext):
    """Builds the op library with build_support (not distutils' Python-extension compile)."""

    def get_ext_filename(self, fullname: str) -> str:
        parts = fullname.split(".")
        if parts[-1] == EXT_NAME.rsplit(".", 1)[1]:
            return str(Path(*parts[:-1], bs.LIBRARY_NAME))
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if ext.name != EXT_NAME:
            return super().build_extension(ext)
        output = Path(self.get_ext_fullpath(ext.name))
        bs.compile_library(output, csrc=HERE / CSRC, force=self.force, log=print)


class PlatformWheel(bdist_wheel):
    """Tags the wheel ``py3-none-<platform>``: the op library is a plain shared library that
    uses no Python API, so one wheel per platform serves every Python 3 (the platform tag is
    the build machine's, ``linux_x86_64``; ``auditwheel repair`` checks the library's symbol
    versions and retags it manylinux, see README "Wheels")."""

    def get_tag(self) -> tuple[str, str, str]:
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(
    ext_modules=[
        Extension(
            EXT_NAME,
            sources=sorted(str(p.relative_to(HERE)) for p in (HERE / CSRC).rglob("*.cc")),
            depends=sorted(str(p.relative_to(HERE)) for p in (HERE / CSRC).rglob("*.h")),
            language="c++",
        )
    ],
    cmdclass={"build_ext": BuildOpLibrary, "bdist_wheel": PlatformWheel},
)
