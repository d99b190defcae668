import pytest

from aver.io.storage import read_bytes, redact, write_bytes_atomic


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


def test_split_credentials_moves_them_to_the_options():
    from aver.io.storage import split_credentials

    assert split_credentials("s3://bucket/k", {"anon": False}) == ("s3://bucket/k", {"anon": False})
    uri, so = split_credentials("s3://AKIA1:ab/c+d@bucket/p/x.mp4", {"client_kwargs": {}})
    assert uri == "s3://bucket/p/x.mp4" and so == {"client_kwargs": {}, "key": "AKIA1", "secret": "ab/c+d"}
    assert split_credentials("s3://AKIA1:ab%2Fc@bucket/k")[1]["secret"] == "ab/c"
    with pytest.raises(ValueError) as e:
        split_credentials("https://user:topsecret99@host/x")
    assert "topsecret99" not in str(e.value)
    with pytest.raises(ValueError):
        split_credentials("s3://AKIA1:other@bucket/k", {"secret": "different"})


def test_redact_removes_registered_values_and_aws_environment(monkeypatch):
    from aver.io.storage import register_secrets

    register_secrets({"client_kwargs": {"aws_secret_access_key": "nested-secret-1"}, "anon": False,
                      "endpoint_url": "http://127.0.0.1:9000"})
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-2")
    text = redact("botocore said nested-secret-1 and env-secret-2 at http://127.0.0.1:9000")
    assert "nested-secret-1" not in text and "env-secret-2" not in text
    assert "http://127.0.0.1:9000" in text  # not a secret
    assert redact("s3://KEY:raw/secret+x@bucket/k") == "s3://***@bucket/k"


def test_a_secret_inside_a_longer_one_is_redacted_whole():
    from aver.io.storage import register_secrets

    register_secrets({"key": "prefix12", "secret": "prefix12-and-more-secret"})
    assert redact("x prefix12-and-more-secret y") == "x *** y"
