"""Turn a preset (a partial params.yaml) into `dvc exp run -S key=value` arguments, after validating it.

Usage: python -m internvl_sft.preset presets/internvl2-1b-ui.yaml [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from internvl_sft.config import Params, build


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'llm_lora': {'r': 64}}} -> {'train.llm_lora.r': 64}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def overlay(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = overlay(merged[key], value)
        else:
            merged[key] = value
    return merged


def set_arguments(preset: Path, params: Path) -> list[str]:
    """Validate params+preset against the schema, then return the -S arguments for `dvc exp run`."""
    overrides = yaml.safe_load(preset.read_text(encoding="utf-8")) or {}
    base = yaml.safe_load(params.read_text(encoding="utf-8")) or {}
    build(Params, overlay(base, overrides), where=f"{params} + {preset}")
    args: list[str] = []
    for key, value in flatten(overrides).items():
        args += ["-S", f"{key}={json.dumps(value, ensure_ascii=False)}"]
    return args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("preset", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    print(shlex.join(set_arguments(args.preset, args.params)))


if __name__ == "__main__":
    main()
