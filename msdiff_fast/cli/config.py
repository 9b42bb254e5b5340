"""``--config FILE``: settings from a JSON or TOML file, turned into the flags they stand for."""

import argparse
import json
from pathlib import Path
from typing import Dict, List, Sequence

from ..errors import UsageError, one_line


def load_config(path: str, command: str, commands: Sequence[str]) -> Dict:
    """Settings for ``command`` from a JSON or TOML file: its [command] table, else its top level
    (less the tables of the other ``commands``)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {file}: no such file")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--config {file}: cannot read it ({one_line(err)})") from None
    if file.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:
            raise UsageError(f"--config {file}: TOML needs Python 3.11+ (tomllib); write the settings as JSON instead") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"--config {file}: invalid TOML ({one_line(err)})") from None
    elif file.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"--config {file}: invalid JSON ({one_line(err)})") from None
    else:
        raise UsageError(f"--config {file}: expected a .json or .toml file")
    if not isinstance(data, dict):
        raise UsageError(f"--config {file}: expected a table of settings, got {type(data).__name__}")
    section = data.get(command)
    if isinstance(section, dict):
        return section
    return {key: value for key, value in data.items() if not (isinstance(value, dict) and key in commands)}


def config_arguments(settings: Dict, subparser: argparse.ArgumentParser, source: str) -> List[str]:
    """Command-line tokens equivalent to ``settings`` (placed before the user's flags, which win)."""
    actions = {}
    for action in subparser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                actions[option[2:].replace("-", "_")] = (option, action)
    tokens: List[str] = []
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name in ("config", "help") or name not in actions:
            valid = ", ".join(sorted(k.replace("_", "-") for k in actions if k not in ("config", "help")))
            raise UsageError(
                f"--config {source}: unknown setting {key!r} for `msdiff {subparser.prog.split()[-1]}` (valid: {valid})", 2
            )
        option, action = actions[name]
        takes_list = action.nargs in ("+", "*")
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UsageError(f"--config {source}: {key} expects true or false, got {value!r}", 2)
            tokens += [option] if value else []
        elif isinstance(value, list):
            if not takes_list:
                raise UsageError(f"--config {source}: {key} expects one value, got a list {value!r}", 2)
            tokens += [option, *map(str, value)]
        elif isinstance(value, (dict, bool)) or value is None:
            expected = "list" if takes_list else "number or string"
            raise UsageError(f"--config {source}: {key} expects a {expected}, got {value!r}", 2)
        else:
            tokens += [option, str(value)]
    return tokens
