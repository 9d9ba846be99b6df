"""Turn a preset (a partial params.yaml) into `dvc exp run -S key=value` arguments, after validating it.

A preset may start with `extends: other.yaml` (a path relative to the preset): its overrides apply on top of
that preset's. `--set key=value` adds overrides on top of the preset (values are YAML), and `--processes N`
checks that the global batch splits over N processes. Every key is set once.

Usage: python -m internvl_sft.preset presets/internvl2-1b-ui.yaml [--params params.yaml] [--set k=v] [--processes N]
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from internvl_sft.config import ConfigError, Params, build, gradient_accumulation

EXTENDS = "extends"


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


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{'train.llm_lora.r': 64} -> {'train': {'llm_lora': {'r': 64}}}."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def overlay(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = overlay(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_preset(preset: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The preset's overrides, on top of the preset it extends (if any)."""
    preset = preset.resolve()
    if preset in seen:
        raise ConfigError(f"{preset}: {EXTENDS} loops back to itself")
    overrides = yaml.safe_load(preset.read_text(encoding="utf-8")) or {}
    parent = overrides.pop(EXTENDS, None)
    if parent is None:
        return overrides
    return overlay(load_preset(preset.parent / parent, (*seen, preset)), overrides)


def parse_assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value")
    return key, yaml.safe_load(value)


def recipe_overrides(preset: Path | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A preset's overrides (none without one), then `extra` dotted-key values on top."""
    return overlay(load_preset(preset) if preset else {}, unflatten(extra or {}))


def params_with(params: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The params file's tree with `overrides` on top (not validated)."""
    return overlay(yaml.safe_load(params.read_text(encoding="utf-8")) or {}, overrides)


def resolve(preset: Path, params: Path, extra: dict[str, Any] | None = None) -> tuple[Params, dict[str, Any]]:
    """The parameters that params + preset + extra overrides make (validated against the schema), and the
    overrides alone."""
    overrides = recipe_overrides(preset, extra)
    return build(Params, params_with(params, overrides), where=f"{params} + {preset}"), overrides


def set_arguments(
    preset: Path, params: Path, extra: dict[str, Any] | None = None, processes: int | None = None
) -> list[str]:
    """Validate params + preset + extra overrides against the schema, then return the -S arguments."""
    resolved, overrides = resolve(preset, params, extra)
    if processes is not None:
        try:
            gradient_accumulation(resolved.train.global_batch_size, resolved.train.per_device_batch_size, processes)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    args: list[str] = []
    for key, value in flatten(overrides).items():
        args += ["-S", f"{key}={json.dumps(value, ensure_ascii=False)}"]
    return args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("preset", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", action="append", default=[], type=parse_assignment, metavar="KEY=VALUE",
                        help="an override on top of the preset (value in YAML)")
    parser.add_argument("--processes", type=int, help="training processes (GPUS): the global batch must split")
    args = parser.parse_args(argv)
    try:
        print(shlex.join(set_arguments(args.preset, args.params, dict(args.set), args.processes)))
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
