"""Prune options from a YAML or JSON file, named exactly like the keyword arguments of
`onnxprune.prune` (which are also the `prune` flags' dests): a config file, a command line and a
Python call then say the same thing in the same words.

On the command line, flags given explicitly override the file. "Explicitly" is decided by parsing
the arguments a second time with every default suppressed, so a flag set to its default value
still wins over the file.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from pathlib import Path

from onnxprune.errors import InputError


def option_names() -> list[str]:
    """The keys a config may hold: `onnxprune.prune`'s keyword-only arguments."""
    from onnxprune.api import prune

    return [n for n, p in inspect.signature(prune).parameters.items() if p.kind is p.KEYWORD_ONLY]


def load_config(path: "str | os.PathLike[str]") -> dict:
    """Read and check a config: a mapping of option name to value, ready for `prune(model, **config)`.

    Values are checked and converted like the matching command-line flags (types, choices).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read config ({getattr(exc, 'strerror', None) or exc})") from None
    data = _parse(path, text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config must be a mapping of option names to values")
    known = option_names()
    actions = _prune_actions()
    config = {}
    for key, value in data.items():
        if key not in known:
            raise InputError(f"{path}: unknown option {key!r} (known: {', '.join(known)})")
        config[key] = _convert(path, key, value, actions.get(key))
    return config


def apply_config(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Fill `args` from the file named by `args.config`, except the options given in `argv`.

    `parser` must be a fresh parser (its defaults are suppressed in place).
    """
    config = load_config(args.config)
    given = explicit_dests(parser, argv, args.command)
    for key, value in config.items():
        if key not in given:
            setattr(args, key, value)
    return args


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str], command: str) -> set[str]:
    """Dests of the options that `argv` sets explicitly, whatever their value."""
    for action in _subparser(parser, command)._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse keeps subcommands in a private action type
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise InputError(f"no {command} subcommand")


def _prune_actions() -> dict[str, argparse.Action]:
    from onnxprune.cli import _parser

    return {a.dest: a for a in _subparser(_parser(), "prune")._actions}


def _parse(path: Path, text: str):
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise InputError(f"{path}: invalid JSON ({exc})") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); "
                             "a .json config works without it") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: invalid YAML ({' '.join(str(exc).split())[:200]})") from None
    raise InputError(f"{path}: config files must end in .yaml, .yml or .json")


def _convert(path: Path, key: str, value, action: argparse.Action | None):
    """Check one value the way argparse checks the flag: bool switches, lists, types, choices."""
    if action is None or value is None:
        return value
    bad = lambda want: InputError(f"{path}: option {key!r} expects {want}, got {value!r}")  # noqa: E731
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if action.nargs in ("+", "*"):
        items = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(items, list) or (action.nargs == "+" and not items):
            raise bad("a list")
        namespace = argparse.Namespace()  # let the flag's own action shape the value, as on the command line
        action(None, namespace, [_scalar(item, action, bad) for item in items])
        return getattr(namespace, action.dest)
    return _scalar(value, action, bad)


def _scalar(value, action: argparse.Action, bad):
    if isinstance(value, (bool, dict, list)):
        raise bad("a single " + (getattr(action.type, "__name__", None) or "string"))
    if action.type is not None:
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            raise bad(getattr(action.type, "__name__", "a valid value")) from None
        except argparse.ArgumentTypeError:  # a custom type such as --round-to's: name the flag's metavar
            raise bad(action.metavar or "a valid value") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise bad("one of " + ", ".join(map(str, action.choices)))
    return value
