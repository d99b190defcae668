"""Finding inputs and decoding them: videos with PyAV (presentation timestamps), audio at 16 kHz,
still images normalised to 8-bit RGB. Everything streams; nothing holds a whole video."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from aver.constants import CROP_SIZE
from aver.faults import MediaError, is_transient
from aver.io.storage import find_files, has_userinfo, redact, url_to_fs

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp")
AUDIO_EXTENSIONS = (".wav", ".mp3", ".m4a", ".aac", ".flac", ".ogg", ".opus")
ARCHIVE_EXTENSIONS = {".zip": "zip", ".tar": "tar", ".tar.gz": "tar", ".tgz": "tar"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + AUDIO_EXTENSIONS + IMAGE_EXTENSIONS
MIN_SIDE = 20
"""Frames and images smaller than this on their short side hold no detectable face (MTCNN's
smallest face is 20 px; its image pyramid is empty below that)."""
FRAME_MAX_SIDE = 1280
"""Longer side of a sampled frame as it leaves the task that decoded it (larger frames are
downscaled there): the bytes sent to the GPU stage stay bounded (a 4K frame is 9x a 720p one), and a
face keeps full detail in its 140 px crop while it spans 140 px at this size (210 px in 1080p)."""
MAX_DURATION_S = 4 * 3600.0
"""Longest input decoded (by decoded timestamps, never the header): a longer one is ``too_large``."""


@dataclass(frozen=True)
class InputItem:
    source: str
    """URI of the input as listed (local path or fsspec URI)."""
    item_id: str
    """Stable id derived from the source path (same on every rerun)."""
    kind: str
    """'video', 'audio' or 'image' (by extension; decoding decides what it really holds)."""
    refusal: str | None = None
    """Why this listed entry is not read at all (e.g. a manifest entry outside the manifest's
    folder); the input gets status ``unsupported`` with this message."""

    def check(self) -> None:
        """Raise ``unsupported`` for an entry that is not to be read (see ``refusal``)."""
        if self.refusal:
            raise MediaError("unsupported", self.refusal)


def item_id_for(source: str) -> str:
    """``<stem>-<10 hex of sha1(source)>``: readable, stable across reruns, unique per path."""
    canonical = source if "://" in source else os.path.abspath(source)
    stem = os.path.splitext(os.path.basename(canonical.split("::", 1)[0].rstrip("/")))[0]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:40] or "item"
    return f"{safe}-{hashlib.sha1(canonical.encode()).hexdigest()[:10]}"


def _kind(path: str) -> str:
    ext = os.path.splitext(path.split("::", 1)[0])[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in AUDIO_EXTENSIONS:
        return "audio"
    return "video"


def _join(uri: str, fs, path: str) -> str:
    if "://" not in uri:
        return path
    protocol = uri.split("://", 1)[0]
    return f"{protocol}://{path}"


def _manifest_sources(uri: str, storage_options: dict | None) -> list[tuple[str, str | None]]:
    fs, path = url_to_fs(uri, storage_options)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["source"])
        sources = [s for s in table.column("source").to_pylist() if s]
        return [_manifest_entry(uri, fs, os.path.dirname(path), s) for s in sources]
    with fs.open(path, "rt") as f:
        text = f.read()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if path.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
        if rows and "source" not in rows[0]:
            raise ValueError(f"manifest {redact(uri)} has no 'source' column")
        sources = [r["source"].strip() for r in rows if r.get("source")]
    else:
        sources = [ln.strip() for ln in lines]
    return [_manifest_entry(uri, fs, os.path.dirname(path), s) for s in sources]


def _manifest_entry(manifest: str, fs, base: str, entry: str) -> tuple[str, str | None]:
    """(source, refusal) of one manifest entry. Relative entries resolve under the manifest's
    folder and may not climb out of it. A local manifest may also name absolute paths and URIs (it
    is the user's own list); a remote one only URIs of its own store (``s3://...`` in an S3
    manifest): it must not make a cluster node read the node's local files or other services."""
    remote = "://" in manifest and not manifest.startswith("file://")
    if has_userinfo(entry):
        return redact(entry), "credentials inside manifest entries are not accepted: use --storage-options or the environment"
    if "://" in entry or os.path.isabs(entry):
        if not remote:
            return entry, None
        protocol = manifest.split("://", 1)[0]
        if entry.startswith(protocol + "://") and "::" not in entry:
            return entry, None
        return entry, f"a {protocol}:// manifest may only name {protocol}:// URIs and relative paths"
    resolved = os.path.normpath(os.path.join(base, entry))
    if resolved != base and not resolved.startswith(base.rstrip("/") + "/"):
        return _join(manifest, fs, resolved), f"manifest entry {entry!r} climbs out of the manifest's folder"
    return _join(manifest, fs, resolved), None


def _archive_sources(uri: str, lower: str, storage_options: dict | None) -> list[str]:
    # Members are addressed as chained fsspec URIs, e.g. zip://faces/0001.jpg::s3://bucket/crops.zip
    protocol = next(p for ext, p in ARCHIVE_EXTENSIONS.items() if lower.endswith(ext))
    outer = uri if "://" in uri else os.path.abspath(uri)
    fs, _ = url_to_fs(f"{protocol}://::{outer}", storage_options)
    members = [m for m in fs.find("") if not os.path.basename(m).startswith(".")]
    return [f"{protocol}://{m}::{outer}" for m in members]


def _glob(fs, pattern: str) -> list[str]:
    """Files matching ``pattern`` (``*`` within a folder, ``**`` across folders): one recursive
    listing of the folder above the first wildcard, then a filter. Linear in the files listed; no
    per-match call (``fs.glob`` asks ``isdir`` of matches, quadratic on s3fs's listing cache)."""
    from fsspec.utils import glob_translate

    parts = pattern.split("/")
    fixed = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))
    root = "/".join(parts[:fixed]) or ("/" if pattern.startswith("/") else "")
    depth = None if "**" in pattern else len(parts) - fixed
    try:
        files = fs.find(root, maxdepth=depth)
    except FileNotFoundError:
        return []
    match = re.compile(glob_translate(pattern)).match
    return [p for p in files if match(p)]


def list_inputs(uri: str, storage_options: dict | None = None,
                extensions: tuple[str, ...] = MEDIA_EXTENSIONS) -> list[InputItem]:
    """Inputs named by a folder (recursive), a glob, an archive (.zip/.tar/.tar.gz: its members),
    a manifest (.txt/.lst one URI per line, .csv or .parquet with a ``source`` column) or a single
    file; sorted, duplicates removed."""
    fs, path = url_to_fs(uri, storage_options)
    fs.invalidate_cache()
    lower = path.lower()
    refusals: dict[str, str] = {}
    if any(ch in path for ch in "*?["):
        sources = [_join(uri, fs, p) for p in _glob(fs, path) if not os.path.basename(p).startswith(".")]
    elif lower.endswith(tuple(ARCHIVE_EXTENSIONS)) and fs.isfile(path):
        sources = _archive_sources(uri, lower, storage_options)
    elif lower.endswith((".txt", ".lst", ".csv", ".parquet")) and fs.isfile(path):
        entries = _manifest_sources(uri, storage_options)
        sources = [s for s, _ in entries]
        allowed = {s for s, why in entries if not why}  # one file named twice: an allowed entry wins
        refusals = {s: why for s, why in entries if why and s not in allowed}
        extensions = ()  # a manifest names its files: take them all, decoding decides
    elif fs.isdir(path):
        return items_in_listing(uri, find_files(fs, path), extensions)
    elif fs.exists(path):
        sources = [uri]
        extensions = ()
    else:
        raise FileNotFoundError(f"input not found: {redact(uri)}")
    return _items(sources, extensions, refusals)


def items_in_listing(uri: str, paths: list[str], extensions: tuple[str, ...] = MEDIA_EXTENSIONS) -> list[InputItem]:
    """The inputs among ``paths``, a recursive listing of the folder ``uri`` (hidden files skipped)."""
    protocol = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return _items([protocol + p for p in paths if not os.path.basename(p).startswith(".")], extensions, {})


def _items(sources: list[str], extensions: tuple[str, ...], refusals: dict[str, str]) -> list[InputItem]:
    if extensions:
        sources = [s for s in sources if s.split("::", 1)[0].lower().endswith(extensions)]
    return [InputItem(s, item_id_for(s), _kind(s), refusals.get(s)) for s in sorted(set(sources))]


def _raise_read_error(source: str, e: OSError) -> None:
    """A file that is not there (or not a file) is a ``corrupt`` input; for any other fault (a
    storage fault, to be retried) this returns and the caller re-raises it unchanged."""
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        raise MediaError("corrupt", f"{redact(source)} cannot be read: {type(e).__name__}") from None
    if e.errno == errno.ELOOP:
        raise MediaError("corrupt", f"{redact(source)} cannot be read: a symbolic link loop") from None


def _open(source: str, storage_options: dict | None):
    """A binary file object and its size. A file that is not there (or not a file) is a
    ``corrupt`` input; storage faults propagate, to be retried."""
    if has_userinfo(source):
        raise MediaError("unsupported", f"{redact(source)}: credentials inside input URIs are not accepted")
    try:
        if "://" not in source or (source.startswith("file://") and "::" not in source):
            path = source[len("file://"):] if source.startswith("file://") else source
            return open(path, "rb"), os.path.getsize(path)
        fs, path = url_to_fs(source, storage_options)
        if "::" in source:  # an archive member: read it while its archive filesystem is alive
            with fs.open(path, "rb") as f:
                data = f.read()
            return io.BytesIO(data), len(data)
        return fs.open(path, "rb"), fs.size(path)
    except OSError as e:
        _raise_read_error(source, e)
        raise


@dataclass
class VideoFrame:
    index: int
    """Index of the frame in the decoded stream (0-based)."""
    timestamp_s: float
    """Presentation time in seconds from the stream's start."""
    image: np.ndarray
    """HxWx3 uint8 RGB."""
    view: tuple[np.ndarray, float] | None = None
    """The frame at face-detection resolution and its scale (made beside the decoding, on its CPU)."""
    cut: bool = False
    """A shot cut comes before this frame (its colours differ from the previous sampled frame's)."""


def _av_error(source: str, e: Exception) -> Exception:
    """What a decoder failure means: a storage fault propagates as it is (to be retried), anything
    else is a ``corrupt`` input."""
    if is_transient(e):
        return e
    return MediaError("corrupt", f"cannot decode {redact(source)}: {type(e).__name__}: {e}")


@dataclass(frozen=True)
class ClipRange:
    """A time range of a video read on its own (:meth:`VideoReader.frames`)."""

    start_s: float
    """Its first sampling slot's start, from the stream's first frame."""
    end_s: float | None
    """The next range's start; None: to the end."""
    origin_s: float
    """Presentation time of the stream's first frame (what times are counted from)."""


def probe_video(source: str, *, storage_options: dict | None = None, longer_than: float = 0.0,
                max_bytes: int = 20 * 2**30) -> tuple[float, float] | None:
    """``(duration by the header, presentation time of the first frame)`` of a video whose header
    says it runs longer than ``longer_than`` seconds; None for any other input (shorter, no header
    duration, not decodable: reading it whole decides). Reads the header and decodes one frame."""
    try:
        with VideoReader(source, storage_options=storage_options, max_bytes=max_bytes) as reader:
            container = reader._container
            vs = container.streams.video[0]
            duration = (float(vs.duration * vs.time_base) if vs.duration
                        else container.duration / 1e6 if container.duration else None)
            if duration is None or duration <= longer_than:
                return None
            for frame in container.decode(vs):
                if frame.pts is not None:
                    return duration, float(frame.pts * frame.time_base)
    except MediaError:
        return None
    return None


def decode_threads(cpus: float) -> int:
    """FFmpeg threads for a task that reserved ``cpus`` CPUs: as many, at least one. FFmpeg's own
    choice is a thread per core of the machine, so sixteen load tasks on a 16-core node would run
    256 decoding threads, and one task alone would take cores reserved for others."""
    return max(1, int(cpus))


class VideoReader:
    """Streams frames of one video sampled at ``fps`` by presentation timestamp, turned upright by
    the stream's display matrix.

    Nothing is taken from the container header that decoding can contradict: sizes are checked on
    decoded frames, and :attr:`decoded_s` / :attr:`n_decoded` say how much was really decoded.
    Opening or decoding raises :class:`MediaError` (``corrupt``, ``no_video``, ``unsupported``,
    ``too_large``); storage faults propagate unchanged.
    """

    def __init__(self, source: str, *, storage_options: dict | None = None, max_bytes: int = 20 * 2**30,
                 max_pixels: int = 7680 * 4320, max_duration_s: float = MAX_DURATION_S,
                 min_side: int = MIN_SIDE, threads: int = 0) -> None:
        import av

        self.source = source
        self.threads = threads
        """FFmpeg decoding threads: 0 lets FFmpeg take one per core of the machine; a Ray task passes
        the CPUs it reserved (:func:`decode_threads`)."""
        self.max_pixels, self.max_duration_s, self.min_side = max_pixels, max_duration_s, min_side
        self.decoded_s = 0.0
        """Seconds of video decoded so far (last frame's end relative to the first frame)."""
        self.n_decoded = 0
        """Frames decoded so far (of the clip read, when one is)."""
        self.ended = False
        """The stream ended before the range read did (always so reading to the end)."""
        self.before: np.ndarray | None = None
        """Reading a clip: the frame sampled last before it, when decoding from the keyframe saw it."""
        f, size = _open(source, storage_options)
        if size == 0:
            f.close()
            raise MediaError("corrupt", f"{redact(source)} is empty (0 bytes)")
        if size > max_bytes:
            f.close()
            raise MediaError("too_large", f"{redact(source)} is {size} bytes, over the {max_bytes}-byte limit")
        self._file = f
        try:
            self._container = av.open(f, mode="r", metadata_errors="ignore")
        except Exception as e:  # noqa: BLE001 - any demuxer failure is a corrupt input
            f.close()
            raise _av_error(source, e) from None
        if not self._container.streams.video:
            kind = "audio only" if self._container.streams.audio else "no streams"
            self.close()
            raise MediaError("no_video", f"{redact(source)} has no video stream ({kind})")
        vs = self._container.streams.video[0]
        if vs.codec_context is None:  # FFmpeg has no decoder for this codec (an unknown fourcc)
            self.close()
            raise MediaError("unsupported", f"{redact(source)}: no decoder for its video codec")
        self.has_audio = bool(self._container.streams.audio)

    def frames(self, fps: float, clip: "ClipRange | None" = None) -> Iterator[VideoFrame]:
        """Frames at ``fps``: for each slot [k/fps, (k+1)/fps) of presentation time from the stream's
        first frame, the first frame in it. With ``clip``, only the slots in its range: decoding
        starts at the keyframe at or before it (frames before it dropped), so a video read clip by
        clip gives exactly the frames, indices and times of one read whole. A frame's index is its
        presentation time times the stream's frame rate (its number in a constant-rate stream; never
        a count of decoded frames, which restarts at a seek)."""
        if fps <= 0:
            raise ValueError("fps must be positive")
        vs = self._container.streams.video[0]
        vs.thread_type = "AUTO"
        if self.threads:
            vs.codec_context.thread_count = self.threads
        rate = float(vs.average_rate or vs.guessed_rate or 0) or None
        origin = clip.origin_s if clip is not None else None
        begin, end = (clip.start_s, clip.end_s) if clip is not None else (0.0, None)
        next_t, period, last_index, n = begin, 1.0 / fps, -1, 0
        # the frame sampled last before the clip (its colours tell a cut at the clip's first frame):
        # the first frame of the last slot before it, known when decoding began before that slot
        first_t, slot_before, before = None, None, None
        if clip is not None and begin > 0:
            at = origin + max(0.0, begin - 2 * period)
            self._container.seek(int(at / vs.time_base), stream=vs, backward=True, any_frame=False)
        try:
            for frame in self._container.decode(vs):
                n += 1
                if n == 1:
                    self._check_size(frame.width, frame.height)
                if frame.pts is None:
                    continue
                t = float(frame.pts * frame.time_base)
                origin = t if origin is None else origin
                t -= origin
                if end is not None and t + 1e-6 >= end:
                    return  # the next clip's
                if t > self.max_duration_s:
                    raise MediaError("too_large", f"{redact(self.source)} runs longer than the "
                                                  f"{self.max_duration_s:.0f} s limit (by decoded timestamps)")
                if t + 1e-6 < begin:  # decoded from the keyframe before the clip
                    first_t = t if first_t is None else first_t
                    slot = int((t + 1e-6) / period)
                    if slot != slot_before:
                        slot_before, before = slot, frame if first_t <= slot * period + 1e-6 else None
                    continue
                if before is not None:
                    self.before = upright(before.to_ndarray(format="rgb24"), before.rotation)
                    before = None
                step = float(frame.duration * frame.time_base) if frame.duration else 0.0
                self.n_decoded += 1
                self.decoded_s = max(self.decoded_s, t + step)
                if t + 1e-6 < next_t:
                    continue
                next_t = (int((t + 1e-6) / period) + 1) * period
                # two sampled frames of a variable-rate stream may round to one number: keep them apart
                index = max(round(t * rate) if rate else int(round(frame.pts)), last_index + 1)
                last_index = index
                yield VideoFrame(index, round(t, 6), upright(frame.to_ndarray(format="rgb24"), frame.rotation))
            self.ended = True
        except MediaError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken packet midway: report, keep what decoded
            raise _av_error(self.source, e) from None

    def _check_size(self, w: int, h: int) -> None:
        if w * h > self.max_pixels:
            raise MediaError("too_large", f"{redact(self.source)} is {w}x{h}, over {self.max_pixels} pixels")
        if min(w, h) < self.min_side:
            raise MediaError("unsupported", f"{redact(self.source)} is {w}x{h}: frames smaller than "
                                            f"{self.min_side} px hold no detectable face")

    def close(self) -> None:
        try:
            self._container.close()
        except Exception:  # noqa: BLE001
            pass
        self._file.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def upright(image: np.ndarray, rotation: float) -> np.ndarray:
    """``image`` turned as its display matrix says: ``rotation`` degrees counter-clockwise (PyAV's
    ``VideoFrame.rotation``; phones store portrait video sideways with such a matrix)."""
    k = int(round((rotation or 0) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(image, k)) if k else image


def read_audio(source: str, *, storage_options: dict | None = None, sample_rate: int = 16000,
               max_duration_s: float = MAX_DURATION_S) -> np.ndarray:
    """The first audio stream as mono float32 at ``sample_rate``; raises ``MediaError('no_audio')``,
    and ``too_large`` past ``max_duration_s`` of decoded audio."""
    chunks = list(audio_chunks(source, storage_options=storage_options, sample_rate=sample_rate,
                               max_duration_s=max_duration_s))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def audio_chunks(source: str, *, storage_options: dict | None = None, sample_rate: int = 16000,
                 max_duration_s: float = MAX_DURATION_S, chunk_samples: int = 1 << 20) -> Iterator[np.ndarray]:
    """:func:`read_audio` ``chunk_samples`` at a time (the last chunk shorter), decoded as they are
    asked for: a long recording is never held whole. Raises as :func:`read_audio` does, possibly
    after some chunks."""
    import av

    f, size = _open(source, storage_options)
    with f:
        if size == 0:
            raise MediaError("corrupt", f"{redact(source)} is empty (0 bytes)")
        try:
            container = av.open(f, mode="r", metadata_errors="ignore")
        except Exception as e:  # noqa: BLE001
            raise _av_error(source, e) from None
        with container:
            if not container.streams.audio:
                raise MediaError("no_audio", f"{redact(source)} has no audio stream")
            if container.streams.audio[0].codec_context is None:
                raise MediaError("unsupported", f"{redact(source)}: no decoder for its audio codec")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            held, n_held, n, limit = [], 0, 0, int(max_duration_s * sample_rate)

            def full() -> Iterator[np.ndarray]:
                nonlocal held, n_held
                while n_held >= chunk_samples:
                    joined = np.concatenate(held)
                    yield joined[:chunk_samples].astype(np.float32)
                    held, n_held = [joined[chunk_samples:]], n_held - chunk_samples

            try:
                for frame in container.decode(container.streams.audio[0]):
                    for out in resampler.resample(frame):
                        held.append(out.to_ndarray().reshape(-1))
                        n_held += held[-1].size
                        n += held[-1].size
                    if n > limit:
                        raise MediaError("too_large", f"{redact(source)}: audio runs longer than the "
                                                      f"{max_duration_s:.0f} s limit")
                    yield from full()
                for out in resampler.resample(None):
                    held.append(out.to_ndarray().reshape(-1))
                    n_held += held[-1].size
                yield from full()
            except MediaError:
                raise
            except Exception as e:  # noqa: BLE001
                raise _av_error(source, e) from None
            if n_held:
                yield np.concatenate(held).astype(np.float32)


def _read_whole(source: str, storage_options: dict | None, limit: int) -> bytes:
    """All bytes of a small file in one request (one ranged GET on object stores: no HEAD first,
    which triples the requests per crop); more than ``limit`` bytes is ``too_large``."""
    if has_userinfo(source):
        raise MediaError("unsupported", f"{redact(source)}: credentials inside input URIs are not accepted")
    try:
        if "://" not in source or (source.startswith("file://") and "::" not in source):
            with open(source[len("file://"):] if source.startswith("file://") else source, "rb") as f:
                data = f.read(limit + 1)
        else:
            fs, path = url_to_fs(source, storage_options)
            data = fs.cat_file(path, start=0, end=limit + 1)
    except OSError as e:
        _raise_read_error(source, e)
        raise
    if len(data) > limit:
        raise MediaError("too_large", f"{redact(source)} is over the {limit}-byte limit for an image")
    return data


MAX_IMAGE_BYTES = 512 * 2**20
"""Largest image file read (a 100-megapixel PNG is about 300 MB)."""


def load_image(source: str, *, storage_options: dict | None = None, max_pixels: int = 100_000_000,
               min_side: int = MIN_SIDE) -> np.ndarray:
    """An image as HxWx3 uint8 RGB: grayscale/palette/RGBA/16-bit are normalised; huge, tiny or
    undecodable images raise :class:`MediaError`."""
    from PIL import Image

    data = _read_whole(source, storage_options, MAX_IMAGE_BYTES)
    size = len(data)
    with io.BytesIO(data) as f:
        if size == 0:
            raise MediaError("corrupt", f"{redact(source)} is empty (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # size is checked below
                img = Image.open(f)
            w, h = img.size
            if w * h > max_pixels:
                raise MediaError("too_large", f"{redact(source)} is {w}x{h}, over {max_pixels} pixels")
            if min(w, h) < min_side:
                raise MediaError("unsupported", f"{redact(source)} is {w}x{h}, smaller than {min_side} px")
            img.load()
        except MediaError:
            raise
        except Image.DecompressionBombError as e:
            raise MediaError("too_large", f"{redact(source)}: {e}") from None
        except Exception as e:  # noqa: BLE001
            if is_transient(e):
                raise
            raise MediaError("corrupt", f"cannot decode image {redact(source)}: {type(e).__name__}: {e}") from None
    return to_rgb8(img)


def to_rgb8(img) -> np.ndarray:
    """PIL image of any mode -> HxWx3 uint8 RGB (alpha composited on black, 16-bit scaled)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        arr = np.asarray(img, dtype=np.float32)
        rgb = arr[..., :3] * (arr[..., 3:4] / 255.0)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def decode_jpeg(data: bytes) -> np.ndarray:
    """An encoded crop (extract_faces' ``crop`` column) as HxWx3 uint8 RGB."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_faces(table) -> tuple[list[str], np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """A slice of a faces part (``crop_id``, ``crop``) decoded: the ids of its rows with a crop, the
    ``[k,140,140,3]`` crops that decode, a mask over those ids of the ones that did, and
    ``(crop_id, why)`` of the ones that did not (one bad crop costs itself only)."""
    import pyarrow.compute as pc

    table = table.filter(pc.is_valid(table["crop"]))
    ids = table["crop_id"].to_pylist()
    images, decoded, failed = [], np.ones(len(ids), bool), []
    for i, (crop_id, data) in enumerate(zip(ids, table["crop"].to_pylist())):
        try:
            images.append(decode_jpeg(data))
        except Exception as e:  # noqa: BLE001
            decoded[i] = False
            failed.append((crop_id, type(e).__name__))
    return ids, resize_crops(images), decoded, failed


def resize_crops(images) -> np.ndarray:
    """uint8 RGB crops (``[B,H,W,3]`` array or a list of HxWx3) as one ``[B,140,140,3]`` array;
    crops of another size are resized (bilinear)."""
    from PIL import Image

    if isinstance(images, np.ndarray) and images.shape[1:3] == (CROP_SIZE, CROP_SIZE):
        return images
    if not len(images):
        return np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    return np.stack([im if im.shape[:2] == (CROP_SIZE, CROP_SIZE)
                     else np.asarray(Image.fromarray(im).resize((CROP_SIZE,) * 2, Image.BILINEAR))
                     for im in images])
