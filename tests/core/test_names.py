"""Context names: what may be a file name in the contexts folder and a name in <anima:name:scale>."""

from __future__ import annotations

import os

import pytest

from lib_anima.errors import ArgumentError
from lib_anima.names import MAX_NAME_LENGTH, check_name, context_path, name_problem

BAD = [
    "../x", "..", ".", "/abs", "/etc/passwd", "a/b", "a\\b", "..\\x", "nul\x00", "a\nb", "tab\there", "del\x7f",
    "CON", "con", "Nul", "PRN.txt", "aux", "COM1", "lpt9", ".hidden", "x" * (MAX_NAME_LENGTH + 1), "", "   ",
    " pad", "pad ", "a:b", "<x>", "a>b", 'q"uote', "a|b", "a?b", "a*b", "a,b", "a;b", "\ud800", None, 3, b"bytes",
]
GOOD = ["猫", "my style 2", "style", "a.b", "x" * MAX_NAME_LENGTH, "name-with_dash", "Ünïcödé", "conan", "com", "lpt",
        "CONSOLE", "a..b", "emoji 😺", "1"]


@pytest.mark.parametrize("name", BAD, ids=repr)
def test_bad_names_refused(tmp_path, name):
    assert name_problem(name) is not None
    with pytest.raises(ArgumentError, match="invalid context name"):
        check_name(name)
    with pytest.raises(ArgumentError):
        context_path(str(tmp_path), name)


@pytest.mark.parametrize("name", GOOD)
def test_good_names_accepted(tmp_path, name):
    assert name_problem(name) is None
    assert check_name(name) == name
    path = context_path(str(tmp_path), name)
    assert os.path.dirname(path) == os.path.realpath(tmp_path)
    assert os.path.basename(path) == name + ".safetensors"
    with open(path, "wb") as f:  # the file system takes it
        f.write(b"")
    assert os.listdir(tmp_path) == [name + ".safetensors"]


@pytest.mark.parametrize(
    "name,words",
    [("../x", "/"), ("", "empty"), (" pad", "white space"), ("x" * 101, "101 characters"), ("CON", "reserved"),
     (".hidden", "starts with '.'"), ("nul\x00", "control character"), ("a:b", ":"), ("a,b", ",")],
)
def test_problem_says_why(name, words):
    assert words in name_problem(name)


def test_context_path_refuses_symlink_out_of_the_folder(tmp_path):
    folder = tmp_path / "contexts"
    folder.mkdir()
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"")
    os.symlink(outside, folder / "link.safetensors")
    with pytest.raises(ArgumentError, match="outside the contexts folder"):
        context_path(str(folder), "link")
