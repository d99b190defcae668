import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aver.faults import MediaError, RetryPolicy
from aver.io import parts
from aver.io.parts import find_parts, read_slices


def _part(path, n=50, row_group=8):
    pq.write_table(pa.table({"crop_id": [f"c{i:03d}" for i in range(n)], "v": np.arange(n)}), path,
                   row_group_size=row_group)


def test_a_fault_mid_part_reopens_it_at_the_row_it_stopped(tmp_path, monkeypatch):
    # Guards against: a storage fault half-way through a part starting it over (rows twice) or
    # ending it (rows lost), and a reopen that starts at the wrong row group.
    _part(tmp_path / "p.parquet")
    opened, real = [], parts._slices_from

    def flaky(uri, columns, rows, so, start):
        opened.append(start)
        for k, table in enumerate(real(uri, columns, rows, so, start)):
            if len(opened) < 3 and k == 2:  # the first two openings fail after two slices each
                raise ConnectionResetError("reset by peer")
            yield table

    monkeypatch.setattr(parts, "_slices_from", flaky)
    got = pa.concat_tables(read_slices(str(tmp_path / "p.parquet"), ["crop_id", "v"], 5,
                                       policy=RetryPolicy(attempts=3, backoff_s=0)))
    assert got["v"].to_pylist() == list(range(50))
    # reopened at row 10 (inside the second row group), then where the second opening's two slices ended
    assert opened[:2] == [0, 10] and len(opened) == 3 and opened[2] > 10


def test_faults_past_the_retries_and_files_that_are_no_part_raise(tmp_path, monkeypatch):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(MediaError, match="not a readable part"):
        list(read_slices(str(tmp_path / "bad.parquet"), ["crop_id"], 5))

    def always(uri, columns, rows, so, start):
        raise ConnectionResetError("reset by peer")
        yield

    monkeypatch.setattr(parts, "_slices_from", always)
    with pytest.raises(ConnectionResetError):
        list(read_slices(str(tmp_path / "bad.parquet"), ["crop_id"], 5, policy=RetryPolicy(attempts=2, backoff_s=0)))


def test_find_parts_in_a_faces_folder_or_the_folder_itself(tmp_path):
    (tmp_path / "out" / "faces").mkdir(parents=True)
    for name in ("b", "a", ".tmp-x"):
        _part(tmp_path / "out" / "faces" / f"{name}.parquet", n=2)
    found, files = find_parts(str(tmp_path / "out"))
    assert [n for n, _ in found] == ["a", "b"] and found[0][1] == str(tmp_path / "out" / "faces" / "a.parquet")
    assert find_parts(str(tmp_path / "out" / "faces"))[0] == found
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.jpg").write_bytes(b"")
    none, files = find_parts(str(tmp_path / "images"))
    assert none == [] and files == [str(tmp_path / "images" / "x.jpg")]
    assert find_parts(str(tmp_path / "images" / "x.jpg")) == ([], None)
