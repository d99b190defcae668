import io

import numpy as np
import pyarrow as pa
from PIL import Image

from aver.pipelines.report import build_report, circumplex_figure, circumplex_png, index_html, inputs_page_html, timeline_png
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


def test_circumplex_index_and_pages():
    table = pa.Table.from_pylist([_summary("a"), {**_summary("b"), "valence_mean": 0.5, "dominant_expression": None}],
                                 schema=SUMMARY_SCHEMA)
    img = np.asarray(Image.open(io.BytesIO(circumplex_png(table))).convert("RGB")).astype(float)
    assert img.shape == (600, 900, 3) and img.std() > 10
    status = [{"video_id": "a", "source": "/a/a.mp4", "status": "ok", "error": None},
              {"video_id": "z<b>", "source": "/a/z.mp4", "status": "corrupt", "error": "cannot decode <x>"}]
    index = index_html(status, {"a": _summary("a")}, page_size=1)
    assert index.count("<tr>") == 1 + 2  # header, two inputs; no timelines on the index
    assert 'href="page-00001.html#a"' in index and 'href="page-00002.html#z&lt;b&gt;"' in index
    assert "corrupt=1, ok=1" in index and "circumplex.png" in index
    first = inputs_page_html(status[:1], {"a": _summary("a")}, {"a"}, 1, 2)
    second = inputs_page_html(status[1:], {}, set(), 2, 2)
    assert 'src="a.png"' in first and 'id="a"' in first and ".png" not in second
    assert "z&lt;b&gt;" in second and "cannot decode &lt;x&gt;" in second  # escaped, never raw HTML
    assert not any("http" in page for page in (index, first, second))  # opens offline from disk


def _archive(n, seed=0):
    rng = np.random.default_rng(seed)
    centre = rng.uniform(-0.1, 0.1, 2)  # crowded near the origin, as an archive's means are
    return pa.Table.from_pylist([{**_summary(f"interview_{i:04d}_camera_b"), "valence_mean": float(centre[0] + rng.normal(0, 0.05)),
                                  "arousal_mean": float(centre[1] + rng.normal(0, 0.05))} for i in range(n)],
                                schema=SUMMARY_SCHEMA)


def test_circumplex_names_never_overlap_and_an_archive_becomes_a_density():
    # Guards against: labels written at their points, piling on each other near the origin.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = circumplex_figure(_archive(30))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, renderer) for t in fig.axes[0].texts]  # the text, not its leader line
    assert len(boxes) == 30 and {t.get_text() for t in fig.axes[0].texts} == {f"interview_{i:04d}_camera_b" for i in range(30)}
    width, height = fig.canvas.get_width_height()
    for i, a in enumerate(boxes):
        assert 0 <= a.x0 and a.x1 <= width and 0 <= a.y0 and a.y1 <= height  # inside the picture
        assert not any(a.overlaps(b) for b in boxes[i + 1:]), fig.axes[0].texts[i].get_text()
    big = circumplex_figure(_archive(2000))
    assert not big.axes[0].texts and big.axes[0].collections  # no names: a density of 2000 means
    img = np.asarray(Image.open(io.BytesIO(circumplex_png(_archive(2000)))).convert("RGB")).astype(float)
    assert img.std() > 10


def test_build_report_pages_an_archive_and_is_rebuilt_only_when_parts_change(tmp_path):
    # Guards against: one page holding every timeline (20k images), and a no-op rerun re-reading
    # every part to write the same report again.
    from aver.io.parts import status_table, write_table

    out = tmp_path / "out"
    ids = [f"v{i}" for i in range(5)]
    for vid in ids:
        write_table(str(out / "status" / f"{vid}.parquet"),
                    status_table([{"video_id": vid, "source": f"/a/{vid}.mp4", "status": "ok", "error": None}]))
        write_table(str(out / "summary" / f"{vid}.parquet"), pa.Table.from_pylist([_summary(vid)], schema=SUMMARY_SCHEMA))
    (out / "report").mkdir()
    (out / "report" / "v3.png").write_bytes(timeline_png(_scores(), _summary("v3")))
    uri, rebuilt = build_report(str(out), page_size=2)
    assert rebuilt and uri.endswith("index.html")
    pages = sorted(p.name for p in (out / "report").glob("page-*.html"))
    assert pages == ["page-00001.html", "page-00002.html", "page-00003.html"]
    texts = [(out / "report" / p).read_text() for p in pages]
    for i, vid in enumerate(ids):  # each input on exactly the page the index links it to
        assert [f'id="{vid}"' in t for t in texts] == [j == i // 2 for j in range(3)]
        assert f'href="page-{i // 2 + 1:05d}.html#{vid}"' in (out / "report" / "index.html").read_text()
    assert 'src="v3.png"' in texts[1] and texts[1].count("<img") == 1
    before = (out / "report" / "index.html").stat().st_mtime_ns
    assert build_report(str(out), page_size=2) == (uri, False)
    assert (out / "report" / "index.html").stat().st_mtime_ns == before
    # a part rewritten under its own name (a retried unit) counts as a change
    write_table(str(out / "status" / "v1.parquet"),
                status_table([{"video_id": "v1", "source": "/a/v1.mp4", "status": "corrupt", "error": "late"}]))
    assert build_report(str(out), page_size=2) == (uri, True)
    assert "corrupt=1, ok=4" in (out / "report" / "index.html").read_text()
