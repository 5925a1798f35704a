"""files: the one atomic writer, and output paths checked before any work starts."""

from __future__ import annotations

import os
import stat

import pytest

from convscope.errors import ConvscopeError
from convscope.files import (
    OutputPathError,
    atomic_write,
    check_output_dir,
    check_output_path,
    write_bytes,
    write_text,
)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_writes_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "out.txt"
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert os.path.dirname(tmp) == str(tmp_path)  # beside the target: the rename stays on one disk
        assert tmp.endswith(".txt")  # writers that pick the format from the suffix get the real one
        with open(tmp, "w") as f:
            f.write("new")

    assert atomic_write(target, write) == target
    assert target.read_text() == "new"
    assert _leftovers(tmp_path) == ["out.txt"] and not os.path.exists(seen[0])


def test_atomic_write_suffix_and_permissions(tmp_path):
    seen = []
    atomic_write(tmp_path / "x", lambda tmp: (seen.append(tmp), open(tmp, "w").close()), suffix=".png")
    assert seen[0].endswith(".png")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "x").st_mode) == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt(), OSError(28, "No space left on device")],
                         ids=["exception", "ctrl-c", "disk-full"])
def test_atomic_write_keeps_the_old_file_on_any_exception(tmp_path, error):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, write)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == ["out.txt"]


def test_atomic_write_without_an_old_file_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.bin", lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert _leftovers(tmp_path) == []


def test_atomic_write_creates_missing_folders(tmp_path):
    write_text("é", tmp_path / "a" / "b" / "t.txt")
    assert (tmp_path / "a" / "b" / "t.txt").read_text(encoding="utf-8") == "é"
    write_bytes(b"\x00\x01", tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


# ---------------------------------------------------------------- check_output_path
def test_output_path_error_is_a_user_error():
    assert issubclass(OutputPathError, ConvscopeError)


def test_good_paths_pass_and_nothing_is_created(tmp_path):
    assert check_output_path(tmp_path / "a.png", (".png", ".jpg")) == tmp_path / "a.png"
    assert check_output_path(tmp_path / "A.PNG", (".png",))  # suffixes compare case-insensitively
    assert check_output_path(tmp_path / "new" / "deeper" / "a.png", (".png",))  # folders that can be made
    assert check_output_path(tmp_path / "any.thing")  # no suffix list: any suffix
    (tmp_path / "exists.png").write_bytes(b"x")
    assert check_output_path(tmp_path / "exists.png", (".png",))  # overwriting is allowed
    assert _leftovers(tmp_path) == ["exists.png"]


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text
    return text


def test_unknown_suffix(tmp_path):
    with pytest.raises(OutputPathError) as info:
        check_output_path(tmp_path / "out.xyz", (".png", ".jpg"), what="picture")
    text = _one_line(info.value)
    assert "out.xyz" in text and ".xyz" in text and ".png, .jpg" in text and "picture" in text
    with pytest.raises(OutputPathError, match="no suffix"):
        check_output_path(tmp_path / "out", (".png",))


def test_existing_directory(tmp_path):
    (tmp_path / "d.png").mkdir()
    with pytest.raises(OutputPathError, match="is a directory") as info:
        check_output_path(tmp_path / "d.png", (".png",))
    _one_line(info.value)


def test_folder_that_is_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file" / "out.png", tmp_path / "file" / "sub" / "out.png"):
        with pytest.raises(OutputPathError, match="not a folder") as info:
            check_output_path(path, (".png",))
        _one_line(info.value)
    assert _leftovers(tmp_path) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="not writable"):
            check_output_path(ro / "out.png", (".png",))
    finally:
        ro.chmod(0o700)


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path) == tmp_path
    assert check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match="not a folder"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(OutputPathError, match="not a writable folder"):
        check_output_dir(tmp_path / "f" / "run")
