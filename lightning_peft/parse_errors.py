"""One line for a config the parser rejects: the offending key, what is wrong, and where to look for the fix.

jsonargparse explains a bad value inside a ``class_path`` entry as a nested report (every union member tried, the
whole given value); the user needs the innermost key and reason first.
"""

from __future__ import annotations

import dataclasses
import pydoc
import re

_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_OPTION = re.compile(r"Option '([^']+)' is not accepted")
_GROUP_OPTION = re.compile(r"Group '([^']+)' does not accept option '([^']+)'")
_EXPECTED = re.compile(r"Expected a ([^.]+|typing\.Literal\[.*\])$")  # one union member's refusal, alone on its line
_GIVEN = re.compile(r"Given value: (.*)$")
_EXPECTED_GOT = re.compile(r"Expected a (typing\.Literal\[.*\]|[^.]+)\. Got value: (.*)$")  # a plain option's refusal
#: lines of the nested report that only describe its structure
_STRUCTURE = ("Does not validate against", "Subtypes:", "Errors:", "Given value type")


def _plain_mapping(class_path: str) -> bool:
    """Whether a config written as plain keys (``training: {lr: …}``) is behind ``class_path``: our option
    dataclasses are; peft's and transformers' configs take ``class_path`` / ``init_args``."""
    return class_path.startswith("lightning_peft.") and dataclasses.is_dataclass(pydoc.locate(class_path))


def _type_name(expected: str) -> str:
    """``<class 'float'>`` as ``float``, ``typing.Literal['auto']`` as ``'auto'``, ``NoneType`` as ``null``."""
    if literal := re.fullmatch(r"typing\.Literal\[(.*)\]", expected):
        return literal.group(1).replace(", ", " or ")
    name = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", expected)
    return "null" if name == "NoneType" else name


def describe_parse_error(message: str, command: list[str]) -> str:
    """``message`` (a jsonargparse error) as ``<key>: <reason>; <fix>``.

    Example::

        describe_parse_error('Parser key "data":\\n  ...\\n  Option \\'batch_sizee\\' is not accepted', ["fit"])
        # "data.init_args.batch_sizee: not an option of lightning_peft.ClassificationDataModule; …"
    """
    if "argument subcommand" in message:  # the subcommand itself is wrong: its help would not exist
        command = []
    command_line = " ".join(["lightning-peft", *command])
    hint = f"run `{command_line} --help` for the options, or add --print_config to see a valid config"
    if message.startswith("Problems parsing config"):
        details = " ".join(line.strip() for line in message.splitlines()[1:]).replace('in "<unicode string>", ', "")
        reason = message.splitlines()[0].split(":", 1)[-1].strip()
        return f"--config: the file is not valid YAML ({reason} {details}); fix it at that line"
    keys: list[str] = []
    class_path = None
    reason = None
    expected: list[str] = []  # a union's members, each of which refused the value
    given = None
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if found := _EXPECTED.match(line):
            if given is None:  # the innermost union's members come first; outer ones only add null
                expected.append(_type_name(found.group(1)))
            continue
        if found := _GIVEN.match(line):
            given = given if given is not None else found.group(1)
            continue
        if not line or line.startswith(_STRUCTURE):
            continue
        if key := _KEY.match(line):
            keys.append(key.group(1))
            rest = line[key.end():].strip(" :")
            if rest and reason is None:
                reason = rest
        elif found := _CLASS_PATH.match(line):
            class_path = found.group(1)
            if not _plain_mapping(class_path):
                keys.append("init_args")
        elif reason is None:
            reason = line
    if reason is None and expected and given is not None:
        reason = f"expected {' or '.join(expected)}, got {given!r}"
        if given == "None" and "null" in expected and len(keys) > 1:
            reason += (  # YAML's null is `null`; and jsonargparse hands a command-line null nested in init_args on
                # as the text 'None', so the enclosing option given as YAML is the form that works
                f" (write null as `null`; on the command line give the enclosing option as YAML: "
                f"--{'.'.join(keys[:-1])} '{{{keys[-1]}: null}}')"
            )
    if reason is None or not keys:
        first = message.strip().splitlines()[0] if message.strip() else "the configuration is invalid"
        return f"{first}; {hint}"
    if found := _EXPECTED_GOT.match(reason):
        reason = f"expected {_type_name(found.group(1))}, got {found.group(2)!r}"
    if group := _GROUP_OPTION.search(reason):
        keys += [group.group(1), group.group(2)] if keys[-1] == "init_args" else [group.group(2)]
        return f"{'.'.join(keys)}: not an option of {group.group(1)}; check its spelling; {hint}"
    if keys[-1] == "init_args" and class_path and not _OPTION.search(reason):
        keys[-1] = "class_path"  # the class itself could not be imported
        reason = f"cannot use {class_path!r} ({reason})"
    if option := _OPTION.search(reason):
        keys.append(option.group(1))
        reason = f"not an option of {class_path}" if class_path else "not an option here"
        hint = "check its spelling; " + hint
    return f"{'.'.join(keys)}: {reason}; {hint}"
