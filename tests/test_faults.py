import errno

import pytest

from aver.faults import MediaError, RetryPolicy, classify, describe, is_transient, with_retries


def _client_error(code: str, http: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": http}},
                       "GetObject")


def _s3fs_error(code: str, http: int):
    from s3fs.errors import translate_boto_error

    return translate_boto_error(_client_error(code, http))


@pytest.mark.parametrize("exc,status", [
    (MediaError("no_face", "x"), "no_face"),
    (PermissionError(errno.EACCES, "Permission denied"), "failed"),  # may clear (a mount, a policy)
    (TimeoutError("read timed out"), "failed"),
    (ConnectionResetError(errno.ECONNRESET, "reset"), "failed"),
    (OSError(errno.EIO, "I/O error"), "failed"),
    (_s3fs_error("SlowDown", 503), "failed"),
    (_s3fs_error("InternalError", 500), "failed"),
    (_s3fs_error("ServiceUnavailable", 503), "failed"),
    (_client_error("Throttling", 400), "failed"),
    (_s3fs_error("NoSuchKey", 404), "corrupt"),
    (FileNotFoundError(errno.ENOENT, "gone"), "corrupt"),
    (IsADirectoryError(errno.EISDIR, "dir"), "corrupt"),
    (OSError(errno.ELOOP, "Too many levels of symbolic links"), "corrupt"),
    (ValueError("Protocol not known: foo"), "unsupported"),
    (ZeroDivisionError("a bug"), "error"),
    (KeyError("x"), "error"),
    (ValueError("a bug with a bad value"), "error"),
])
def test_classify(exc, status):
    assert classify(exc) == status


def test_botocore_network_errors_are_transient_and_bad_uris_are_not():
    from botocore.exceptions import EndpointConnectionError, ParamValidationError, ReadTimeoutError

    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://x"))
    bad = ParamValidationError(report="Invalid bucket name")
    assert not is_transient(bad) and classify(bad) == "unsupported"


def test_transient_cause_is_followed_but_not_past_from_none():
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert is_transient(e)
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError:
            raise MediaError("corrupt", "judged") from None
    except MediaError as e:
        assert not is_transient(e) and classify(e) == "corrupt"


def test_with_retries_retries_transient_faults_only(monkeypatch):
    sleeps = []
    monkeypatch.setattr("aver.faults.time.sleep", sleeps.append)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    policy = RetryPolicy(attempts=4, backoff_s=0.5, max_backoff_s=0.8)
    assert with_retries(flaky, policy) == "ok" and len(calls) == 3 and sleeps == [0.5, 0.8]
    calls.clear()

    def down():
        calls.append(1)
        raise ConnectionResetError("down")

    with pytest.raises(ConnectionResetError):
        with_retries(down, policy)
    assert len(calls) == 4  # given up after the policy's attempts
    calls.clear()

    def bug():
        calls.append(1)
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        with_retries(bug, policy)
    assert len(calls) == 1  # a bug is not retried


def test_describe_names_the_type_and_redacts():
    from aver.io.storage import register_secrets

    register_secrets({"secret": "hunter2hunter2"})
    text = describe(OSError("cannot open s3://AKIA:pw/x+y@bucket/k with hunter2hunter2"))
    assert text.startswith("OSError: ") and "hunter2hunter2" not in text and "pw/x+y" not in text


def test_media_error_takes_content_statuses_only():
    with pytest.raises(ValueError):
        MediaError("failed", "a transient fault is not a verdict about the content")


def test_http_faults_of_fetches():
    import urllib.error

    assert is_transient(urllib.error.URLError("timed out"))
    for code, transient in ((500, True), (503, True), (429, True), (408, True), (404, False), (403, False)):
        assert is_transient(urllib.error.HTTPError("http://x", code, "m", {}, None)) is transient, code


def test_retry_policy_validation():
    for bad in ({"attempts": 0}, {"backoff_s": -1.0}, {"max_backoff_s": -1.0}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)
    assert RetryPolicy(attempts=1, backoff_s=0.0, max_backoff_s=0.0).delay(5) == 0.0


def test_media_error_survives_pickling():
    # Guards against: a verdict that cannot cross from a load task to the write task (records are pickled).
    import pickle

    from aver.faults import MediaError

    e = pickle.loads(pickle.dumps(MediaError("corrupt", "broken after 3 frames")))
    assert isinstance(e, MediaError) and e.status == "corrupt" and str(e) == "broken after 3 frames"
