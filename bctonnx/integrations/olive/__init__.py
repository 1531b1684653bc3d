"""Olive (``olive-ai``): bctonnx's compression as the workflow pass ``BCTCompression``.

Olive resolves a pass ``type`` through a package config, a JSON table from pass names to the
classes that implement them (``olive/olive_config.json`` in Olive; ``olive/package_config.py``
reads it). ``olive run --package-config FILE`` replaces Olive's own table with FILE, so the file
bctonnx gives Olive holds Olive's passes *and* ``BCTCompression``:

    python -m bctonnx.integrations.olive -o bct-olive.json
    olive run --config workflow.json --package-config bct-olive.json

(`write_package_config`; from Python, ``olive.workflows.run(config,
package_config=bctonnx.integrations.olive.package_config())``). ``BCTCompression``'s own entry
ships as ``olive_config.json`` beside this file; the pass is `bct_pass.BCTCompression`.
Nothing here imports Olive until it is used: a missing ``olive-ai`` is a one-line error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from pathlib import Path

from ...errors import BctError
from .. import require_extra

PASS_NAME = "BCTCompression"


def bct_pass_entries() -> dict:
    """bctonnx's own package config (``olive_config.json``): the ``BCTCompression`` entry."""
    text = resources.files(__name__).joinpath("olive_config.json").read_text(encoding="utf-8")
    return json.loads(text)


def package_config() -> dict:
    """Olive's own package config (the installed olive-ai's) with ``BCTCompression`` added."""
    require_extra("olive", "olive", "the Olive pass")
    from olive.package_config import OlivePackageConfig

    path = Path(OlivePackageConfig.get_default_config_path())
    config = json.loads(path.read_text(encoding="utf-8"))
    ours = bct_pass_entries()
    config.setdefault("passes", {}).update(ours["passes"])
    for name, deps in ours.get("extra_dependencies", {}).items():
        config.setdefault("extra_dependencies", {})[name] = deps
    return config


def write_package_config(path: str | os.PathLike) -> Path:
    """`package_config` as a JSON file for ``olive run --package-config`` (written whole or
    not at all)."""
    target = Path(path)
    if target.is_dir():
        raise BctError(f"{target} is a directory; name the JSON file to write")
    text = json.dumps(package_config(), indent=4) + "\n"
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BctError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bctonnx.integrations.olive",
        description="Write the package config that lets `olive run` resolve BCTCompression: "
        "the installed Olive's passes plus bctonnx's.",
    )
    parser.add_argument("-o", "--output", required=True, metavar="FILE.json")
    args = parser.parse_args(argv)
    try:
        path = write_package_config(args.output)
    except BctError as exc:
        print(f"bctonnx: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{path}: Olive's passes and {PASS_NAME}; olive run --package-config {path}")
    return 0
