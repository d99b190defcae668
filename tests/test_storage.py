import pytest

from aver.storage import read_bytes, redact, write_bytes_atomic


@pytest.mark.parametrize("uri,secret", [
    ("s3://AKIAXXX:supersecret@bucket/key", "supersecret"),
    ("https://user:pw123@host/file.pt", "pw123"),
    ("https://bucket.s3.amazonaws.com/f.pt?X-Amz-Signature=abcdef&X-Amz-Credential=AKIA", "abcdef"),
    ("https://host/f?token=tok999&x=1", "tok999"),
])
def test_redact_hides_secrets(uri, secret):
    out = redact(uri)
    assert secret not in out and "***" in out


def test_redact_keeps_plain_uris():
    assert redact("s3://bucket/path/file.parquet") == "s3://bucket/path/file.parquet"
    assert redact("/data/x.mp4") == "/data/x.mp4"


def test_atomic_write_local_and_s3(tmp_path, s3):
    target = tmp_path / "a" / "b.bin"
    write_bytes_atomic(str(target), b"hello")
    assert target.read_bytes() == b"hello"
    assert [p.name for p in target.parent.iterdir()] == ["b.bin"]
    uri = f"s3://{s3['bucket']}/x/b.bin"
    write_bytes_atomic(uri, b"world", s3["options"])
    assert read_bytes(uri, s3["options"]) == b"world"
