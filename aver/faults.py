"""What happens when one input fails: the status it gets, which faults are retried, and how.

Every input ends with exactly one status (SPEC §6). A verdict about the content (``corrupt``,
``no_face``, ...) is final. A transient fault (storage or network: S3 5xx and throttling,
timeouts, connection resets, permissions that may clear) is retried with backoff; what still
fails is ``failed``, which a rerun does again. Anything else is ``error``: an unexpected
exception, reported with its type and message and logged with its traceback.
"""

from __future__ import annotations

import errno
import logging
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from aver.io.storage import redact

log = logging.getLogger("aver")

CONTENT_STATUSES = ("ok", "no_face", "no_audio", "no_video", "corrupt", "unsupported", "too_short", "too_large")
"""Verdicts about an input's content: final, a rerun does not redo them."""
STATUSES = CONTENT_STATUSES + ("failed", "error")
"""Every status an input can get; ``failed`` (a transient fault outlived the retries) is redone by a rerun."""
RETRIED = ("failed",)
"""Statuses a rerun processes again."""

_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EPIPE,
                     errno.ESTALE, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE, errno.EINTR,
                     getattr(errno, "EREMOTEIO", errno.EIO)}
# botocore, aiohttp, fsspec and urllib3 network errors, matched by class name so none is imported here.
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "HTTPClientError", "ResponseStreamingError", "IncompleteReadError", "ClientPayloadError",
                    "ServerDisconnectedError", "ClientConnectionError", "ClientOSError", "FSTimeoutError",
                    "IncompleteRead", "ProtocolError", "NoCredentialsError", "CredentialRetrievalError"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
                    "ExpiredToken", "AccessDenied"}
# Errors that say the URI itself can never be read (a malformed bucket name, an unknown protocol).
_BAD_URI_NAMES = {"ParamValidationError", "InvalidS3AddressingStyleError"}


class MediaError(Exception):
    """An input whose content cannot be processed; ``status`` is one of :data:`CONTENT_STATUSES`."""

    def __init__(self, status: str, message: str) -> None:
        if status not in CONTENT_STATUSES:
            raise ValueError(f"not a content status: {status!r}")
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # it travels between stages inside records
        return MediaError, (self.status, str(self))


@dataclass
class RetryPolicy:
    """How transient storage and network faults are retried inside a job."""

    attempts: int = 4
    """Tries per input (and per output write) before it is given up as ``failed``."""
    backoff_s: float = 1.0
    """Delay before the second try; doubles each try."""
    max_backoff_s: float = 30.0
    """Longest delay between two tries."""

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("RetryPolicy: attempts >= 1, backoff_s >= 0, max_backoff_s >= 0")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (0-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)


def is_transient(exc: BaseException) -> bool:
    """True for storage/network faults that may clear on their own (worth a retry, never a verdict)."""
    for e in _chain(exc):
        if isinstance(e, MediaError):
            return False
        names = {c.__name__ for c in type(e).__mro__}
        if names & _TRANSIENT_NAMES:
            return True
        if isinstance(e, (TimeoutError, ConnectionError, PermissionError)):
            return True
        if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) \
                and e.errno in _TRANSIENT_ERRNOS:
            return True
        code = getattr(e, "code", None)  # urllib's HTTPError
        if "HTTPError" in names and isinstance(code, int):
            return code >= 500 or code in (408, 429)
        if "URLError" in names:
            return True
        response = getattr(e, "response", None)  # botocore's ClientError
        if isinstance(response, dict):
            err = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if err.get("Code") in _TRANSIENT_CODES or status >= 500 or status == 429:
                return True
    return False


def classify(exc: BaseException) -> str:
    """The status an input gets for ``exc`` once retries are over."""
    if isinstance(exc, MediaError):
        return exc.status
    if is_transient(exc):
        return "failed"
    for e in _chain(exc):
        names = {c.__name__ for c in type(e).__mro__}
        if names & _BAD_URI_NAMES or (isinstance(e, ValueError) and "Protocol not known" in str(e)):
            return "unsupported"
        if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) or \
                (isinstance(e, OSError) and e.errno == errno.ELOOP):
            return "corrupt"  # listed but not readable as a file: a verdict about this input
    return "error"


def describe(exc: BaseException) -> str:
    """``Type: message`` with every credential and URI secret redacted (third-party text included)."""
    if isinstance(exc, MediaError):
        return redact(str(exc))
    return redact(f"{type(exc).__name__}: {exc}")


T = TypeVar("T")


def with_retries(fn: Callable[[], T], policy: RetryPolicy, what: str = "") -> T:
    """``fn()``, tried again after transient faults as ``policy`` says; the last fault is raised."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - only transient faults are retried
            if not is_transient(e) or attempt == policy.attempts - 1:
                raise
            wait = policy.delay(attempt)
            log.warning("%s: %s; try %d of %d in %.1f s", redact(what), describe(e), attempt + 2,
                        policy.attempts, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def verdict(exc: BaseException, what: str) -> tuple[str, str]:
    """(status, error text) for ``exc`` raised while processing ``what``; unexpected exceptions are
    logged with their traceback (redacted), since they are bugs worth a look."""
    status = classify(exc)
    text = describe(exc)
    if status == "error":
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        log.error("unexpected error on %s:\n%s", redact(what), redact(tb))
    elif status == "failed":
        log.warning("%s: gave up after retries: %s", redact(what), text)
    return status, text


def guarded(fn: Callable[[], T], policy: RetryPolicy, what: str) -> tuple[T | None, tuple[str, str] | None]:
    """``(fn(), None)``, or ``(None, (status, error))`` for whatever it raised once transient
    faults were retried: one input's failure never reaches its neighbours."""
    try:
        return with_retries(fn, policy, what), None
    except Exception as e:  # noqa: BLE001 - every failure of one input becomes its status row
        return None, verdict(e, what)


def guarded_map(fn: Callable[[Any], T], items: list, threads: int, policy: RetryPolicy,
                source: Callable[[Any], str]) -> list[tuple[T | None, tuple[str, str] | None]]:
    """:func:`guarded` ``fn(item)`` for every item, ``threads`` at a time (reads from remote storage
    are latency-bound: a task that waits for one GET at a time spends its time waiting), in the
    items' order."""
    if not items:
        return []
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(lambda item: guarded(lambda: fn(item), policy, source(item)), items))
