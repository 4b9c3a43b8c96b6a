"""YAML configs with dotted command-line overrides, checked against each stage's defaults and rules.

    cfg = load_config("configs/tiny.yaml", ["rollout.n=8", "reward.weights.length=0.5"], defaults=GRPO_DEFAULTS,
                      open_keys=("reward",), rules={"rollout.top_p": in_range(0, 1, low_open=True), ...})

The defaults dict is the schema: every key set must exist there (except under `open_keys`, whose sub-trees are
checked by their own component) with the default's type (an int passes for a float; a `None` default takes anything);
then each key in `rules` must pass its rule. Both fail before any model loads, naming the key and the nearest one:
`command line: unknown config key 'rollout.nn' (did you mean 'rollout.n'?)`, `rollout.top_p: must be in (0, 1], got 0`.
"""

import argparse
import contextlib
import copy
import difflib
import math
import os
from typing import Any, Callable, Iterable

import yaml


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:  # an empty dict stays a leaf: an empty section
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def did_you_mean(name: Any, options: Iterable, cutoff: float = 0.6) -> str:
    """` (did you mean 'x'?)` naming the option closest to `name`, or "" when none is close."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_type(key: str, value: Any, default: Any, where: str) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, str):  # YAML 1.1 reads `1e-6` (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, type(default)) and isinstance(value, bool) == isinstance(default, bool):
        return value
    raise ValueError(f"{where}{key}: expected {type(default).__name__}, got {type(value).__name__} ({value!r})")


def merge(defaults: dict, updates: dict, *, open_keys: tuple[str, ...] = (), where: str = "") -> dict:
    """`defaults` updated with the (nested) `updates`, every key and type checked; a new dict."""
    known = _flatten(defaults)
    cfg = copy.deepcopy(defaults)
    for key, value in _flatten(updates).items():
        if any(key == k or key.startswith(k + ".") for k in open_keys):
            pass
        elif key in known:
            value = _check_type(key, value, known[key], where)
        elif isinstance(value, dict) and any(k.startswith(key + ".") for k in known):
            continue  # an empty section, e.g. `reward: {}`
        else:
            raise ValueError(f"{where}unknown config key '{key}'{did_you_mean(key, known, cutoff=0.5)}")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = value
    return cfg


def parse_overrides(overrides: list[str]) -> dict:
    """`["a.b=3", "c=[1, 2]"]` -> `{"a": {"b": 3}, "c": [1, 2]}`; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected key.path=value")
        node = tree
        *parents, leaf = key.strip().split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parents[:i + 1])} is a value (set by an earlier "
                                 "override), not a section")
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ValueError(f"override {item!r}: not a YAML value") from None
    return tree


Rule = tuple[Callable[[Any], bool], str]  # (test, what it requires)


def at_least(low: float) -> Rule:
    return (lambda v: v >= low), f"must be >= {low}"


def above(low: float) -> Rule:
    return (lambda v: v > low), f"must be > {low}"


def in_range(low: float, high: float, *, low_open: bool = False) -> Rule:
    if low_open:
        return (lambda v: low < v <= high), f"must be in ({low}, {high}]"
    return (lambda v: low <= v <= high), f"must be in [{low}, {high}]"


def one_of(*options) -> Rule:
    return (lambda v: v in options), f"must be one of {list(options)}"


def above_or_null(low: float) -> Rule:
    return (lambda v: v is None or v > low), f"must be > {low} or null"


NOT_EMPTY: Rule = (lambda v: isinstance(v, str) and v.strip() != ""), "must be a non-empty string"


def check_rules(values: dict[str, Any], rules: dict[str, Rule], prefix: str = "") -> None:
    """Raise ValueError naming the first key (prefix + key, in `rules` order) whose value breaks its rule."""
    for key, (ok, requirement) in rules.items():
        value = values.get(key)
        try:
            good = ok(value)
        except (TypeError, OverflowError):  # None or a list where a number belongs; an int no float holds
            good = False
        if not good:
            raise ValueError(f"{prefix}{key}: {requirement}, got {value!r}")


def load_config(path: str | os.PathLike | None, overrides: list[str], *, defaults: dict,
                open_keys: tuple[str, ...] = (), rules: dict[str, Rule] | None = None) -> dict:
    """Defaults <- YAML file <- dotted overrides, then `rules` in order; errors name the file or the override."""
    cfg = defaults
    if path:  # None or "": defaults only
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                from_file = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(from_file, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        cfg = merge(cfg, from_file, open_keys=open_keys, where=f"{path}: ")
    cfg = merge(cfg, parse_overrides(overrides), open_keys=open_keys, where="command line: ")
    check_rules(_flatten(cfg), rules or {})
    return cfg


def parse_run_args(argv: list[str] | None, *, description: str, default_config: str,
                   add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The training scripts' command line: --config, --resume, --overwrite, overrides, plus `add_arguments`'s."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument("--resume", action="store_true", help="continue from run_dir/checkpoints/latest")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier run's files in run_dir first")
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.n=8 optim.lr=1e-6")
    return parser.parse_intermixed_args(argv)  # flags may follow the overrides


def lr_schedule(cfg: dict) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up for `optim.warmup_steps`, then `optim.schedule`: constant, or a cosine that
    reaches 0 at `train.steps`."""
    warmup, steps, cosine = cfg["optim"]["warmup_steps"], cfg["train"]["steps"], cfg["optim"]["schedule"] == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) if cosine else 1.0
    return factor
