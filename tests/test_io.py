import errno
import json

import pytest

from dmlkit.io import atomic_write_bytes, atomic_writer, write_json


def test_atomic_write_replaces_content(tmp_path):
    target = tmp_path / "a" / "file.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "file.json"
    write_json(target, {"epoch": 1})
    with pytest.raises(OSError) as info:
        with atomic_writer(target, "w") as handle:
            handle.write('{"epoch": 2')  # torn write, then the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC
    assert json.loads(target.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_write_json_accepts_numpy_values(tmp_path):
    np = pytest.importorskip("numpy")
    write_json(tmp_path / "m.json", {"x": np.float32(0.5), "v": np.arange(3)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"x": 0.5, "v": [0, 1, 2]}


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    atomic_write_bytes(tmp_path / "f", b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~umask
