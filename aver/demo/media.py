"""Media writers for the synthetic corpus, the tests and the benchmarks (PyAV)."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from aver.constants import SAMPLE_RATE


def write_video(path: str, frames: Iterator[np.ndarray], fps: float, *, audio: np.ndarray | None = None,
                sample_rate: int = SAMPLE_RATE, codec: str = "libx264", keyframe_every: int | None = None) -> None:
    """Encode HxWx3 uint8 RGB ``frames`` (and optional mono float32 ``audio``) with PyAV.

    Used by the demo corpus and the tests; even frame sizes are required by yuv420p.
    """
    import av
    from fractions import Fraction

    with av.open(path, mode="w") as out:
        vs = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        vs.pix_fmt = "yuv420p"
        vs.options = {"preset": "ultrafast"} if codec == "libx264" else {}
        if keyframe_every:  # a long recording's keyframe interval (x264's own default: 250 frames)
            vs.options = {**vs.options, "g": str(keyframe_every), "keyint_min": str(keyframe_every)}
        a_stream = None
        if audio is not None:
            a_stream = out.add_stream("aac", rate=sample_rate)
            a_stream.layout = "mono"
        first = True
        for img in frames:
            if first:
                vs.height, vs.width = img.shape[:2]
                first = False
            for packet in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if a_stream is not None:
            samples = np.asarray(audio, dtype=np.float32).reshape(1, -1)
            step = 1024
            for start in range(0, samples.shape[1], step):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + step]),
                                                   format="fltp", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                for packet in a_stream.encode(frame):
                    out.mux(packet)
            for packet in a_stream.encode():
                out.mux(packet)
