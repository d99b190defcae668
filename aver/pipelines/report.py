"""The score_videos report: a static ``index.html`` (opens from disk, no network), one timeline PNG
per input (arousal and valence over time, the dominant expression as a colour band) and one
circumplex PNG (valence x arousal) of the whole archive."""

from __future__ import annotations

import html
import io
from typing import Any

import numpy as np
import pyarrow as pa

from aver.constants import AFFECTNET_CLASSES
from aver.io.parts import join, read_folder
from aver.io.storage import exists, write_bytes_atomic

SCORES_SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("track_id", pa.int32()),
    ("t_start_s", pa.float64()),
    ("t_end_s", pa.float64()),
    ("arousal", pa.float32()),
    ("valence", pa.float32()),
    ("face_detected", pa.bool_()),
    ("modality", pa.string()),
    ("expression_probs", pa.list_(pa.float32(), 8)),
])

SUMMARY_SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("source", pa.string()),
    ("status", pa.string()),
    ("duration_s", pa.float64()),
    ("n_steps", pa.int64()),
    ("n_tracks", pa.int32()),
    ("has_audio", pa.bool_()),
    ("modalities", pa.string()),
    ("face_coverage", pa.float32()),
    ("arousal_mean", pa.float32()),
    ("valence_mean", pa.float32()),
    ("arousal_std", pa.float32()),
    ("valence_std", pa.float32()),
    ("dominant_expression", pa.string()),
])

# One colour per AffectNet class (Neutral, Happy, Sad, Surprise, Fear, Disgust, Anger, Contempt).
CLASS_COLOURS = ("#9e9e9e", "#f4c20d", "#3b78e7", "#ff8f00", "#8e24aa", "#2e7d32", "#d32f2f", "#6d4c41")


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in actors

    return Figure(figsize=(width, height), dpi=100)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def timeline_png(scores: pa.Table, summary: dict[str, Any]) -> bytes:
    """Arousal and valence over time (one line per track) above a band of the dominant expression."""
    df = scores.to_pandas().sort_values(["track_id", "t_end_s"], na_position="first")
    fig = _figure(10, 4)
    ax, band = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [5, 1]})
    for tid, part in df.groupby(df["track_id"].fillna(-1), sort=True):
        label = "" if tid < 0 else f" (track {int(tid)})"
        ax.plot(part["t_end_s"], part["arousal"], color="#d32f2f", lw=1.5, label=f"arousal{label}")
        ax.plot(part["t_end_s"], part["valence"], color="#1565c0", lw=1.5, label=f"valence{label}")
    ax.axhline(0, color="#bbbbbb", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("score")
    ax.legend(loc="upper right", fontsize=7, ncol=2)
    ax.set_title(f"{summary['video_id']}  [{summary['status']}; {summary['modalities'] or 'no scores'}]", fontsize=9)
    for _, r in df.iterrows():
        p = r["expression_probs"]
        colour = CLASS_COLOURS[int(np.argmax(p))] if p is not None else "#ffffff"
        band.axvspan(r["t_start_s"], r["t_end_s"], color=colour, lw=0)
    band.set_yticks([])
    band.set_xlabel("time (s)")
    handles = [band.bar(0, 0, color=c, label=n) for n, c in zip(AFFECTNET_CLASSES, CLASS_COLOURS)]
    band.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.9), ncol=8, fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=0.22, top=0.92, hspace=0.08)
    return _png(fig)


def circumplex_png(summary: pa.Table) -> bytes:
    """Each input's mean (valence, arousal) on the circumplex, coloured by its dominant expression."""
    from matplotlib.patches import Circle

    df = summary.to_pandas().dropna(subset=["valence_mean", "arousal_mean"])
    fig = _figure(6, 6)
    ax = fig.subplots()
    ax.add_patch(Circle((0, 0), 1, fill=False, color="#cccccc"))
    ax.axhline(0, color="#cccccc", lw=0.8)
    ax.axvline(0, color="#cccccc", lw=0.8)
    for _, r in df.iterrows():
        name = r["dominant_expression"]
        colour = CLASS_COLOURS[AFFECTNET_CLASSES.index(name)] if name in AFFECTNET_CLASSES else "#000000"
        ax.errorbar(r["valence_mean"], r["arousal_mean"], xerr=r["valence_std"], yerr=r["arousal_std"],
                    fmt="o", color=colour, ms=7, alpha=0.85, elinewidth=0.8)
        ax.annotate(str(r["video_id"])[:24], (r["valence_mean"], r["arousal_mean"]), fontsize=6,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlim(-1.1, 1.1)
    ax.set_ylim(-1.1, 1.1)
    ax.set_aspect("equal")
    ax.set_xlabel("valence")
    ax.set_ylabel("arousal")
    ax.set_title(f"archive circumplex ({len(df)} scored inputs)", fontsize=9)
    return _png(fig)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else html.escape(str(value))


def index_html(status: list[dict], summary: dict[str, dict], timelines: set[str]) -> str:
    """The archive page: one row per input with its status and summary, its timeline below."""
    cols = ("status", "duration_s", "modalities", "face_coverage", "arousal_mean", "valence_mean",
            "dominant_expression")
    head = "".join(f"<th>{c}</th>" for c in ("input", *cols))
    body = []
    for s in sorted(status, key=lambda r: r["video_id"]):
        vid = s["video_id"]
        row = {**s, **summary.get(vid, {}), "status": s["status"]}
        cells = "".join(f"<td>{_fmt(row.get(c))}</td>" for c in cols)
        err = f"<div class=err>{html.escape(s['error'])}</div>" if s.get("error") else ""
        body.append(f"<tr><td><b>{html.escape(vid)}</b><div class=src>{html.escape(str(s['source']))}</div>{err}</td>"
                    f"{cells}</tr>")
        if vid in timelines:
            body.append(f"<tr><td colspan={len(cols) + 1}><img src=\"{html.escape(vid)}.png\" "
                        f"alt=\"timeline of {html.escape(vid)}\"></td></tr>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>aver report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ddd;
padding:4px 8px;vertical-align:top}}.src{{color:#777;font-size:80%}}.err{{color:#b00;font-size:80%}}
img{{max-width:100%}}</style></head><body>
<h1>aver: arousal, valence and expressions</h1>
<p>{len(status)} inputs. Scores are in [-1, 1]; rows say which modalities each score used.</p>
<img src="circumplex.png" alt="archive circumplex" style="max-width:480px">
<table><tr>{head}</tr>
{chr(10).join(body)}
</table></body></html>
"""


def build_report(output: str, storage_options: dict | None = None) -> str:
    """(Re)write ``report/index.html`` and ``report/circumplex.png`` from ``status/`` and ``summary/``."""

    so = storage_options or None
    status = read_folder(join(output, "status"), so).to_pylist()
    try:
        table = read_folder(join(output, "summary"), so)
    except FileNotFoundError:  # nothing scored yet (every input failed)
        table = SUMMARY_SCHEMA.empty_table()
    summary = {r["video_id"]: r for r in table.to_pylist()}
    write_bytes_atomic(join(output, "report", "circumplex.png"), circumplex_png(table), so)
    timelines = {vid for vid in summary if exists(join(output, "report", f"{vid}.png"), so)}
    uri = join(output, "report", "index.html")
    write_bytes_atomic(uri, index_html(status, summary, timelines).encode(), so)
    return uri
