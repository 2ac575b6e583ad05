"""The ctypes side against include/snapshotd.h, as a C compiler sees it:
every struct's size, alignment and field offsets, every enum constant.

A small C program generated from the header prints sizeof / offsetof of each
struct field and the value of each enum constant; the test compares those
with the ctypes structures of ``snapshotd._lib`` and the package's enums.
A struct or enum added to the header without a Python mirror fails here.
"""

from __future__ import annotations

import ctypes
import enum
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from snapshotd import _lib
from snapshotd._dtypes import DType
from snapshotd._enums import Kind, ReconstructionMethod
from snapshotd.errors import ErrorCode

from conftest import REPOSITORY

HEADER = REPOSITORY / "Sources" / "CSnapshotd" / "include" / "snapshotd.h"

#: The header's structs and the ctypes structures that mirror them.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "snapshotd_reconstruction": _lib.Reconstruction,
    "snapshotd_client_options": _lib.ClientOptions,
    "snapshotd_tensor_spec": _lib.TensorSpec,
    "snapshotd_tensor_info": _lib.TensorInfo,
}

#: The header's enums, the Python enum of each and the prefix its member names drop.
ENUMS: dict[str, tuple[type[enum.IntEnum], str]] = {
    "snapshotd_status": (ErrorCode, "SNAPSHOTD_ERR_"),
    "snapshotd_dtype": (DType, "SNAPSHOTD_"),
    "snapshotd_kind": (Kind, "SNAPSHOTD_"),
    "snapshotd_reconstruction_method": (ReconstructionMethod, "SNAPSHOTD_"),
}


def _without_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def header_structs() -> dict[str, list[str]]:
    """Each ``typedef struct NAME { … } NAME;`` of the header with its field names, in order."""
    text = _without_comments(HEADER.read_text())
    structs: dict[str, list[str]] = {}
    for match in re.finditer(r"typedef\s+struct\s+(\w+)\s*\{(.*?)\}\s*(\w+)\s*;", text, re.S):
        assert match[1] == match[3], match[0]
        fields = []
        for declaration in filter(None, (part.strip() for part in match[2].split(";"))):
            field = re.search(r"(\w+)\s*(?:\[\s*\w+\s*\])?$", declaration)
            assert field is not None, declaration
            fields.append(field[1])
        structs[match[1]] = fields
    return structs


def header_enums() -> dict[str, list[str]]:
    """Each ``typedef enum NAME { … } NAME;`` of the header with its constants' names."""
    text = _without_comments(HEADER.read_text())
    return {match[1]: re.findall(r"\b(SNAPSHOTD_\w+)\s*=", match[2])
            for match in re.finditer(r"typedef\s+enum\s+(\w+)\s*\{(.*?)\}\s*(\w+)\s*;", text, re.S)}


def c_program(structs: dict[str, list[str]], enums: dict[str, list[str]]) -> str:
    lines = ["#include <stdalign.h>", "#include <stddef.h>", "#include <stdio.h>", '#include "snapshotd.h"', "",
             "int main(void) {"]
    for struct, fields in structs.items():
        lines.append(f'    printf("struct {struct} %zu %zu\\n", sizeof({struct}), alignof({struct}));')
        for field in fields:
            lines.append(f'    printf("field {struct}.{field} %zu %zu\\n", offsetof({struct}, {field}), sizeof((({struct} *)0)->{field}));')
    for constants in enums.values():
        for constant in constants:
            lines.append(f'    printf("const {constant} %lld\\n", (long long){constant});')
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, ...]]:
    """What the C compiler says: ``struct NAME`` → (size, alignment), ``field S.F`` → (offset, size), ``const C`` → (value,)."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH: the header layout check needs one")
    directory = tmp_path_factory.mktemp("header")
    source = directory / "layout.c"
    source.write_text(c_program(header_structs(), header_enums()))
    program = directory / "layout"
    subprocess.run([compiler, "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", str(HEADER.parent), str(source), "-o", str(program)],
                   check=True)
    output = subprocess.run([str(program)], check=True, capture_output=True, text=True).stdout
    facts: dict[str, tuple[int, ...]] = {}
    for line in output.splitlines():
        what, name, *numbers = line.split()
        facts[f"{what} {name}"] = tuple(int(number) for number in numbers)
    return facts


def test_every_struct_and_enum_of_the_header_has_a_python_mirror() -> None:
    assert sorted(header_structs()) == sorted(STRUCTS), "a struct of snapshotd.h without a ctypes mirror in snapshotd._lib (or a stale one)"
    assert sorted(header_enums()) == sorted(ENUMS), "an enum of snapshotd.h without a Python IntEnum (or a stale one)"


@pytest.mark.parametrize("struct", sorted(STRUCTS))
def test_ctypes_structure_matches_the_c_layout(struct: str, compiled: dict[str, tuple[int, ...]]) -> None:
    mirror = STRUCTS[struct]
    fields = header_structs()[struct]
    assert [name for name, *_ in mirror._fields_] == fields, f"{mirror.__name__}'s fields are not {struct}'s, in order"
    size, alignment = compiled[f"struct {struct}"]
    assert (ctypes.sizeof(mirror), ctypes.alignment(mirror)) == (size, alignment), struct
    for field in fields:
        offset, field_size = compiled[f"field {struct}.{field}"]
        described = getattr(mirror, field)
        assert (described.offset, described.size) == (offset, field_size), f"{struct}.{field}"


@pytest.mark.parametrize("name", sorted(ENUMS))
def test_python_enum_matches_the_c_constants(name: str, compiled: dict[str, tuple[int, ...]]) -> None:
    mirror, prefix = ENUMS[name]
    in_c: dict[str, int] = {}
    for constant in header_enums()[name]:
        (value,) = compiled[f"const {constant}"]
        if constant == "SNAPSHOTD_OK":  # success is no error: no ErrorCode member, and 0 is never raised
            assert value == 0
            continue
        assert constant.startswith(prefix), constant
        in_c[constant.removeprefix(prefix)] = value
    in_python = {member.name: member.value for member in mirror}
    assert in_python == in_c, f"{mirror.__name__} differs from {name}"


def test_the_generated_program_names_every_field(tmp_path: Path) -> None:
    """The generator itself: one line per struct, field and constant of the header."""
    program = c_program(header_structs(), header_enums())
    assert program.count('printf("struct ') == len(STRUCTS)
    assert program.count('printf("field ') == sum(len(fields) for fields in header_structs().values())
    assert 'printf("const SNAPSHOTD_ERR_PROTOCOL ' in program and 'printf("const SNAPSHOTD_CARRIED ' in program
