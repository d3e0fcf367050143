"""The tasks of a sweep: every config of a sweep file crossed with its named variants (one-factor
changes, e.g. configs/ablations.toml) and its grid (every combination of the listed values), with
the file's `base` settings under both and a config's own settings (`[overrides.<config>]`) between.
slurm/sweep.sh asks for one task's training arguments by array index.

    python -m train.sweep count [--sweep configs/sweep.toml]
    python -m train.sweep args INDEX [--sweep configs/sweep.toml] [--sweep-id ID]
    python -m train.sweep list
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
from pathlib import Path

from data_pipeline.errors import command

from .loop.config import Config, ConfigError, load_config, read_toml, toml_value

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = REPO / "configs" / "sweep.toml"


def load_sweep(path: Path | str = DEFAULT_SWEEP) -> dict:
    sweep = read_toml(path, "sweep file")
    unknown = set(sweep) - {"experiment", "configs", "base", "overrides", "variants", "grid"}
    if unknown and "configs" not in sweep and unknown <= {f.name for f in dataclasses.fields(Config)}:  # [data], [model], ...
        raise ConfigError(f"{path} is a training config, not a sweep file: python train/main.py --config {path}")
    if unknown:
        raise ConfigError(f"unknown key {sorted(unknown)[0]} in sweep file {path} "
                          "(known: experiment, configs, base, overrides, variants, grid)")
    if not sweep.get("configs"):
        raise ConfigError(f"sweep file {path} lists no configs")
    _check_shapes(sweep, path)
    stray = set(sweep.get("overrides", {})) - set(sweep["configs"])
    if stray:
        raise ConfigError(f"sweep file {path} has overrides for {sorted(stray)[0]}, which is not one of its configs")
    return sweep


def _check_shapes(sweep: dict, path) -> None:
    """Each section the type the task builder reads, so a slip is a line naming it, not a traceback."""
    def bad(key: str, want: str, got) -> ConfigError:
        return ConfigError(f"sweep file {path}: {key} must be {want}, got {got!r}")

    if not isinstance(sweep.get("experiment", ""), str):
        raise bad("experiment", "a string", sweep["experiment"])
    if not isinstance(sweep["configs"], list) or not all(isinstance(c, str) for c in sweep["configs"]):
        raise bad("configs", "a list of config names", sweep["configs"])
    for section in ("base", "overrides", "variants", "grid"):
        if not isinstance(sweep.get(section, {}), dict):
            raise bad(section, "a table", sweep[section])
    for key, value in sweep.get("grid", {}).items():
        if not isinstance(value, list) or not value:
            raise bad(f"grid.{key}", "a non-empty list of values", value)
    for section in ("overrides", "variants"):
        for name, table in sweep.get(section, {}).items():
            if not isinstance(table, dict):
                raise bad(f"{section}.{name}", "a table of settings", table)


def tasks(sweep: dict) -> list[dict]:
    """[{name, config, overrides, grid_point}] in a fixed order: configs, then variants, then grid points."""
    grid = sweep.get("grid", {})
    keys = sorted(grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    variants = sweep.get("variants") or {"": {}}
    out = []
    for name in sweep["configs"]:
        config = REPO / "configs" / f"{name}.toml"
        for variant, changes in variants.items():
            for point in points:
                settings = {**sweep.get("base", {}), **sweep.get("overrides", {}).get(name, {}), **changes, **point}
                overrides = [f"{k}={toml_value(v)}" for k, v in settings.items()]
                load_config(config, overrides)  # fail now, not in the array task
                label = ",".join(([variant] if variant else []) + [f"{k}={v}" for k, v in point.items()])
                out.append({"name": name + (f"[{label}]" if label else ""), "config": str(config),
                            "overrides": overrides, "grid_point": label or "default"})
    return out


def task_args(sweep: dict, index: int, sweep_id: str) -> list[str]:
    all_tasks = tasks(sweep)
    if not 0 <= index < len(all_tasks):
        raise ConfigError(f"array index {index} is outside the sweep's {len(all_tasks)} tasks (0..{len(all_tasks) - 1})")
    t = all_tasks[index]
    tags = {"sweep_id": sweep_id, "array_index": str(index), "grid_point": t["grid_point"]}
    args = ["--config", t["config"]]
    tracking = {"experiment": sweep.get("experiment", "jpeg-sweep"), "run_name": t["name"], "tags": tags}
    for o in t["overrides"] + [f"tracking.{k}={toml_value(v)}" for k, v in tracking.items()]:
        args += ["--set", o]
    return args


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["count", "args", "list"])
    ap.add_argument("index", nargs="?", type=int)
    ap.add_argument("--sweep", default=str(DEFAULT_SWEEP))
    ap.add_argument("--sweep-id", default="local")
    args = ap.parse_args(argv)
    sweep = load_sweep(args.sweep)
    if args.command == "count":
        print(len(tasks(sweep)))
    elif args.command == "list":
        for i, t in enumerate(tasks(sweep)):
            print(i, t["name"])
    else:
        if args.index is None:
            raise ConfigError("args needs the array index")
        print("\n".join(task_args(sweep, args.index, args.sweep_id)))  # one argument per line
        count, last = len(tasks(sweep)), os.environ.get("SLURM_ARRAY_TASK_MAX")
        if last and int(last) < count - 1:  # sbatch without --array for a longer sweep runs its first 8
            print(f"note: the sweep has {count} tasks (0..{count - 1}) and this job array ends at {last}; "
                  f"sbatch --array=0-{count - 1} slurm/sweep.sh runs them all", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
