"""Turning jsonargparse's nested validation reports into one readable ``error:`` line.

A typo in one callback option produced 60-70 lines in which the key sat near the bottom. The report has a fixed
shape (``Parser key "..."``, ``Problem with given class_path '...'``, ``Expected a ...``, ``Given value: ...``),
so the useful facts can be picked out: the key, the expected type or values, the value given, and for an unknown
option the closest valid name.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
import re
from collections.abc import Sequence

_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_EXPECTED = re.compile(r"Expected a <class '([^']+)'>")
_SUBTYPES = re.compile(r"Subtypes: \[([^\]]*(?:\][^\]]*)?)\]")
_GOT_VALUE = re.compile(r"(?:Got value|Given value): (.+)")
_LITERAL = re.compile(r"Expected a (?:typing\.)?Literal\[([^\]]*)\]\. Got value: (.+)")
_UNKNOWN_SECTION = re.compile(r"Subcommand '(\w+)' does not accept option '([^'.]+)(?:\.[^']*)?'")
#: Top-level keys a config may hold besides the callback sections (for "did you mean" on a misspelt section).
_TOP_LEVEL = ["trainer", "model", "data", "seed_everything", "optimizer", "lr_scheduler", "ckpt_path", "config"]


def _options_of(class_path: str) -> list[str]:
    """The constructor options of an importable class, or ``[]``."""
    module_name, _, name = class_path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), name)
        parameters = inspect.signature(target.__init__).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return [p for p in parameters if p != "self" and parameters[p].kind is not inspect.Parameter.VAR_KEYWORD]


def _unimportable(class_path: str) -> str | None:
    """Why ``class_path`` cannot be imported, with the closest name that exists; ``None`` if it imports.

    The longest importable module prefix is imported, and the first part that fails is matched against what that
    module holds (its attributes and, for a package, its submodules): ``examples.digits.DigitClassifier`` gives
    "did you mean examples.digits.DigitsClassifier?".
    """
    parts = class_path.split(".")
    found, module = 0, None
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        try:
            module = importlib.import_module(prefix)
        except ModuleNotFoundError as error:
            if error.name is not None and prefix.startswith(error.name):
                continue  # this prefix is not a module: try a shorter one
            return f"cannot import {class_path}: importing {prefix} raised ModuleNotFoundError: {error}"
        except Exception as error:  # the user's module exists but fails to import: say so, not "no such class"
            return f"cannot import {class_path}: importing {prefix} raised {type(error).__name__}: {error}"
        found = end
        break
    if module is None:
        return (
            f"cannot import {class_path}: no module {parts[0]!r} (class paths of your own modules resolve from "
            "the working directory)"
        )
    target: object = module
    for index in range(found, len(parts)):
        if not hasattr(target, parts[index]):
            names = [n for n in dir(target) if not n.startswith("_")]
            if hasattr(target, "__path__"):
                names += [info.name for info in pkgutil.iter_modules(target.__path__)]
            close = difflib.get_close_matches(parts[index], names, n=1, cutoff=0.6)
            where = ".".join(parts[:index])
            hint = f"; did you mean {where}.{close[0]}?" if close else f" ({where} has no {parts[index]!r})"
            return f"cannot import {class_path}{hint}"
        target = getattr(target, parts[index])
    return None


def _clean_type(text: str) -> str:
    return re.sub(r"<class '([^']+)'>", r"\1", text).replace("NoneType", "None").replace("typing.", "")


def summarize_config_error(message: str, sections: Sequence[str] = ()) -> str:
    """One line with the key, what is expected, the value given and, for a typo, a close match.

    Messages that are not jsonargparse validation reports come back as their first line.
    """
    keys = _KEY.findall(message)
    class_match = _CLASS_PATH.search(message)
    section = _UNKNOWN_SECTION.search(message)
    if section and not keys:
        return _unknown_section(section.group(1), section.group(2), sections)
    if not keys:
        return message.strip().splitlines()[0] if message.strip() else message
    class_path = class_match.group(1) if class_match else None
    missing = _unimportable(class_path) if class_path else None
    if missing:
        return f"{keys[0]}: {missing}"
    owner = f" ({class_path.rpartition('.')[2]})" if class_path else ""
    unknown = _NOT_ACCEPTED.search(message)
    if unknown:
        return _unknown_option(keys[0] + owner, unknown.group(1), class_path)
    # The innermost key holds the real problem; the outer ones name where it sits.
    detail = message[message.rfind(f'Parser key "{keys[-1]}"') :]
    where = keys[0] + owner + (f".{keys[-1]}" if len(keys) > 1 else "")
    return _wrong_value(where, keys[-1], detail)


def _unknown_option(where: str, option: str, class_path: str | None) -> str:
    """An option the class does not take, with the closest one and the valid ones."""
    options = _options_of(class_path) if class_path else []
    close = difflib.get_close_matches(option, options, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listed = f" Valid options: {', '.join(options)}." if options else ""
    return f"{where}: unknown option {option!r}{hint}{listed}"


def _wrong_value(where: str, key: str, detail: str) -> str:
    """A value of the wrong type or outside the allowed ones, with what is expected."""
    literal = _LITERAL.search(detail)
    if literal:
        allowed = [v.strip().strip("'\"") for v in literal.group(1).split(",")]
        given = literal.group(2).strip()
        close = difflib.get_close_matches(given, allowed, n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{where}: expected one of {', '.join(map(repr, allowed))}, got {given!r}{hint}"
    subtypes = _SUBTYPES.search(detail)
    expected = (
        _clean_type(subtypes.group(1)) if subtypes else ", ".join(_clean_type(e) for e in _EXPECTED.findall(detail))
    )
    value_match = _GOT_VALUE.search(detail)
    value = value_match.group(1).strip() if value_match else "?"
    if key == "pattern" and re.fullmatch(r"\d+", value):
        return (
            f"{where}: got the number {value}: YAML reads an unquoted N:M such as 2:4 as a base-60 number. "
            "Quote it: pattern: '2:4'"
        )
    if "list" in expected and not value.startswith("["):
        return f"{where}: expected a list such as [{value!r}], got the single value {value!r}"
    return f"{where}: expected {expected or 'another value'}, got {value}"


def _unknown_section(subcommand: str, key: str, sections: Sequence[str]) -> str:
    """An option or config section the subcommand does not have, with the closest known one."""
    known = [*sections, *_TOP_LEVEL, "test_after_fit"]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listed = ", ".join(f"{name}:" for name in sections)
    return f"{subcommand}: unknown option or section {key!r}{hint} (callback sections: {listed})"
