import io

import numpy as np
import pyarrow as pa
from PIL import Image

from aver.pipelines.report import circumplex_png, index_html, timeline_png
from aver.pipelines.score import SCORES_SCHEMA, SUMMARY_SCHEMA


def _scores(n=50):
    t = np.arange(1, n + 1) * 0.4
    probs = np.eye(8, dtype=np.float32)[(np.arange(n) // 10) % 8]
    rows = [{"video_id": "v", "track_id": 0, "t_start_s": e - 0.4, "t_end_s": e, "arousal": float(np.sin(e / 3)),
             "valence": float(np.cos(e / 4)), "face_detected": i % 7 != 0, "modality": "audio+visual",
             "expression_probs": probs[i].tolist() if i % 7 != 0 else None} for i, e in enumerate(t)]
    return pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)


def _summary(vid="v"):
    return {"video_id": vid, "source": f"/a/{vid}.mp4", "status": "ok", "duration_s": 20.0, "n_steps": 50,
            "n_tracks": 1, "has_audio": True, "modalities": "audio+visual", "face_coverage": 0.9,
            "arousal_mean": 0.3, "valence_mean": -0.2, "arousal_std": 0.1, "valence_std": 0.2,
            "dominant_expression": "Happy"}


def test_timeline_png_has_its_size_and_is_not_blank():
    png = timeline_png(_scores(), _summary())
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)
    assert img.shape == (400, 1000, 3)
    assert img.std() > 20  # curves, axes, the expression band: far from a flat image
    # the band shows several class colours (Neutral grey, Happy yellow, Sad blue...)
    band = img[300:330, 200:800].reshape(-1, 3)
    assert len({tuple(c) for c in band.astype(int)}) >= 4
    # the arousal (red) and valence (blue) curves are drawn
    red = (img[..., 0] > 180) & (img[..., 1] < 80) & (img[..., 2] < 80)
    assert red.sum() > 200


def test_circumplex_and_index():
    table = pa.Table.from_pylist([_summary("a"), {**_summary("b"), "valence_mean": 0.5, "dominant_expression": None}],
                                 schema=SUMMARY_SCHEMA)
    img = np.asarray(Image.open(io.BytesIO(circumplex_png(table))).convert("RGB")).astype(float)
    assert img.shape == (600, 600, 3) and img.std() > 10
    status = [{"video_id": "a", "source": "/a/a.mp4", "status": "ok", "error": None},
              {"video_id": "z<b>", "source": "/a/z.mp4", "status": "corrupt", "error": "cannot decode <x>"}]
    page = index_html(status, {"a": _summary("a")}, {"a"})
    assert page.count("<tr>") == 1 + 2 + 1  # header, two inputs, one timeline
    assert 'src="a.png"' in page and "circumplex.png" in page
    assert "z&lt;b&gt;" in page and "cannot decode &lt;x&gt;" in page  # escaped, never raw HTML
    assert "http" not in page  # opens offline from disk
