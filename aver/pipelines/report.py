"""The score_videos report: a static ``index.html`` (opens from disk, no network), one timeline PNG
per input (arousal and valence over time, the dominant expression as a colour band) and one
circumplex PNG (valence x arousal) of the whole archive."""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from aver.constants import AFFECTNET_CLASSES
from aver.io.parts import join, read_part
from aver.io.storage import exists, read_bytes, url_to_fs, write_bytes_atomic

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
    ("n_people", pa.int32()),
    ("n_cuts", pa.int32()),
    ("has_audio", pa.bool_()),
    ("modalities", pa.string()),
    ("face_coverage", pa.float32()),
    ("arousal_mean", pa.float32()),
    ("valence_mean", pa.float32()),
    ("arousal_std", pa.float32()),
    ("valence_std", pa.float32()),
    ("dominant_expression", pa.string()),
    ("scoring_version", pa.int32()),
])

TRACKS_SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("track_id", pa.int32()),  # the person: scores/' track_id
    ("primary", pa.bool_()),
    ("first_s", pa.float64()),
    ("last_s", pa.float64()),
    ("seconds_on_screen", pa.float64()),
    ("n_frames", pa.int64()),
    ("n_tracks", pa.int32()),  # motion-linked tracks the person was made of
    ("arousal_mean", pa.float32()),
    ("valence_mean", pa.float32()),
    ("dominant_expression", pa.string()),
    ("crop", pa.binary()),  # the largest, surest face of the person: a small JPEG
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


def timeline_png(scores: pa.Table, summary: dict[str, Any], cuts: list[float] = ()) -> bytes:
    """Arousal and valence over time (one line per person, dashed for the soundtrack; broken where a
    person is off screen) above a band of the dominant expression; shot cuts as grey lines."""
    df = scores.to_pandas().sort_values(["track_id", "t_end_s"], na_position="first")
    fig = _figure(10, 4)
    ax, band = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [5, 1]})
    for tid, part in df.groupby(df["track_id"].fillna(-1), sort=True):
        label, style = (" (soundtrack)", "--") if tid < 0 else (f" (person {int(tid)})", "-")
        gap = part["t_start_s"].to_numpy()[1:] > part["t_end_s"].to_numpy()[:-1] + 1e-6
        t = part["t_end_s"].to_numpy(float)
        for name, colour in (("arousal", "#d32f2f"), ("valence", "#1565c0")):
            y = part[name].to_numpy(float)
            y = np.insert(y, np.flatnonzero(gap) + 1, np.nan)  # no line across a time off screen
            ax.plot(np.insert(t, np.flatnonzero(gap) + 1, np.nan), y, style, color=colour, lw=1.5,
                    label=f"{name}{label}")
    for c in cuts:
        ax.axvline(c, color="#9e9e9e", lw=0.8)
        band.axvline(c, color="#616161", lw=0.8)
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


LABELLED_POINTS = 40
"""Up to this many inputs the circumplex labels each (in a column beside it) and draws its spread;
beyond, it shows their density."""


def curves_png(history: list[dict], title: str) -> tuple[bytes, list[str]]:
    """A training run's curves (one model's metric history, as its NAME.metrics.json holds it): a
    panel per metric over the epochs, losses on one. Returns the PNG and the metrics drawn."""
    names = [k for k in history[0] if k not in ("epoch", "time", "steps")] if history else []
    losses = [k for k in names if k.startswith("loss")]
    panels = ([losses] if losses else []) + [[k] for k in names if k not in losses]
    fig = _figure(3.2 * max(1, len(panels)), 2.6)
    epochs = [int(row["epoch"]) + 1 for row in history]
    for i, keys in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for k in keys:
            ax.plot(epochs, [row.get(k, float("nan")) for row in history], marker=".", label=k)
        ax.set_xlabel("epoch")
        ax.set_title("losses" if keys is losses else keys[0], fontsize=9)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig), names


def circumplex_figure(summary: pa.Table):
    """Each input's mean (valence, arousal) on the circumplex, coloured by its dominant expression,
    its name in a column to the right joined to it by a thin line (names are spaced evenly in the
    order of arousal, so they never overlap however close the points); beyond ``LABELLED_POINTS``
    inputs, a density of the means instead."""
    from matplotlib.patches import Circle

    df = summary.to_pandas().dropna(subset=["valence_mean", "arousal_mean"]).sort_values("arousal_mean",
                                                                                        ascending=False)
    n = len(df)
    labelled = n <= LABELLED_POINTS
    fig = _figure(9 if labelled else 7, max(6.0, 0.16 * n + 1.2) if labelled else 6)
    ax = fig.add_axes((0.09, 0.08, 0.6, 0.84) if labelled else (0.09, 0.08, 0.72, 0.84))
    ax.add_patch(Circle((0, 0), 1, fill=False, color="#cccccc"))
    ax.axhline(0, color="#cccccc", lw=0.8)
    ax.axvline(0, color="#cccccc", lw=0.8)
    if not labelled:  # an archive: where its inputs lie, not a name per dot
        cells = ax.hexbin(df["valence_mean"], df["arousal_mean"], gridsize=24, extent=(-1.1, 1.1, -1.1, 1.1),
                          cmap="viridis", mincnt=1)
        fig.colorbar(cells, cax=fig.add_axes((0.84, 0.08, 0.03, 0.84)), label="inputs per cell")
        df = df.iloc[:0]
    for i, (_, r) in enumerate(df.iterrows()):
        e = r["dominant_expression"]
        colour = CLASS_COLOURS[AFFECTNET_CLASSES.index(e)] if e in AFFECTNET_CLASSES else "#000000"
        ax.errorbar(r["valence_mean"], r["arousal_mean"], xerr=r["valence_std"], yerr=r["arousal_std"],
                    fmt="o", color=colour, ms=6, alpha=0.85, elinewidth=0.8)
        ax.annotate(str(r["video_id"])[:32], (r["valence_mean"], r["arousal_mean"]), xycoords="data",
                    xytext=(1.04, 1 - (i + 0.5) / n), textcoords="axes fraction", fontsize=7, va="center",
                    color="#333333", annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": "#bbbbbb", "lw": 0.5, "shrinkA": 0, "shrinkB": 4})
    ax.set_xlim(-1.1, 1.1)
    ax.set_ylim(-1.1, 1.1)
    ax.set_xlabel("valence")
    ax.set_ylabel("arousal")
    ax.set_title(f"archive circumplex ({n} scored inputs)", fontsize=9)
    return fig


def circumplex_png(summary: pa.Table) -> bytes:
    """:func:`circumplex_figure` as a PNG."""
    return _png(circumplex_figure(summary))


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else html.escape(str(value))


COLUMNS = ("status", "duration_s", "modalities", "face_coverage", "arousal_mean", "valence_mean", "dominant_expression")
STYLE = """<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ddd;
padding:4px 8px;vertical-align:top}.src{color:#777;font-size:80%}.err{color:#b00;font-size:80%}
img{max-width:100%}</style>"""


def page_name(number: int) -> str:
    return f"page-{number:05d}.html"


def _cells(s: dict, summary: dict[str, dict]) -> str:
    row = {**s, **summary.get(s["video_id"], {}), "status": s["status"]}
    return "".join(f"<td>{_fmt(row.get(c))}</td>" for c in COLUMNS)


def _page(title: str, body: str) -> str:
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>{STYLE}"
            f"</head><body>\n{body}\n</body></html>\n")


def index_html(status: list[dict], summary: dict[str, dict], page_size: int) -> str:
    """The archive page: counts per status, the circumplex, and one row per input (sorted by id)
    linking to the page that holds its timeline (``page_size`` inputs per page)."""
    counts: dict[str, int] = {}
    for s in status:
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    head = "".join(f"<th>{c}</th>" for c in ("input", *COLUMNS))
    rows = []
    for i, s in enumerate(sorted(status, key=lambda r: r["video_id"])):
        vid = html.escape(s["video_id"])
        link = f"{page_name(i // page_size + 1)}#{vid}"
        rows.append(f"<tr><td><a href=\"{link}\">{vid}</a></td>{_cells(s, summary)}</tr>")
    pages = " ".join(f"<a href=\"{page_name(n + 1)}\">{n + 1}</a>" for n in range(-(-len(status) // page_size)))
    return _page("aver report", f"""<h1>aver: arousal, valence and expressions</h1>
<p>{len(status)} inputs ({html.escape(", ".join(f"{k}={v}" for k, v in sorted(counts.items())))}). Scores are in
[-1, 1]; rows say which modalities each score used. Timelines, {page_size} inputs a page: {pages}</p>
<img src="circumplex.png" alt="archive circumplex" style="max-width:480px">
<table><tr>{head}</tr>
{chr(10).join(rows)}
</table>""")


def inputs_page_html(status: list[dict], summary: dict[str, dict], timelines: set[str], number: int,
                     n_pages: int) -> str:
    """One page of inputs: each with its status, summary, error and timeline."""
    head = "".join(f"<th>{c}</th>" for c in ("input", *COLUMNS))
    body = []
    for s in status:
        vid = s["video_id"]
        err = f"<div class=err>{html.escape(s['error'])}</div>" if s.get("error") else ""
        body.append(f"<tr id=\"{html.escape(vid)}\"><td><b>{html.escape(vid)}</b><div class=src>"
                    f"{html.escape(str(s['source']))}</div>{err}</td>{_cells(s, summary)}</tr>")
        if vid in timelines:
            body.append(f"<tr><td colspan={len(COLUMNS) + 1}><img src=\"{html.escape(vid)}.png\" loading=\"lazy\" "
                        f"alt=\"timeline of {html.escape(vid)}\"></td></tr>")
    nav = " ".join(f"<a href=\"{page_name(n)}\">{'<b>' + str(n) + '</b>' if n == number else n}</a>"
                   for n in range(1, n_pages + 1))
    return _page(f"aver report, page {number}", f"""<p><a href="index.html">index</a> | pages: {nav}</p>
<table><tr>{head}</tr>
{chr(10).join(body)}
</table>""")


def _listing(folder: str, so) -> dict[str, str]:
    """``{part name: version}`` of a folder's complete parts from one listing (size and time)."""
    fs, path = url_to_fs(folder, so)
    fs.invalidate_cache()
    try:
        infos = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for info in infos:
        name = os.path.basename(info["name"].rstrip("/"))
        if name.endswith(".parquet") and not name.startswith("."):
            stamp = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
            out[name[: -len(".parquet")]] = f"{info.get('size')}:{stamp}"
    return out


def _read_parts(folder: str, names: list[str], so, threads: int = 32) -> list[dict]:
    def read(name: str) -> list[dict]:
        table = read_part(join(folder, f"{name}.parquet"), so)
        return table.to_pylist() if table is not None else []

    with ThreadPoolExecutor(threads) as pool:
        return [row for rows in pool.map(read, names) for row in rows]


def build_report(output: str, storage_options: dict | None = None, page_size: int = 200) -> tuple[str, bool]:
    """(Re)write ``report/``: ``index.html``, ``circumplex.png`` and ``page-NNNNN.html`` pages of
    ``page_size`` inputs, from ``status/`` and ``summary/`` read in parallel; nothing is written
    when no part changed since the last build (``report/_built``). Returns the index URI and
    whether it was rebuilt."""
    so = storage_options or None
    folders = {name: _listing(join(output, name), so) for name in ("status", "summary")}
    stamp = hashlib.sha256(json.dumps(folders, sort_keys=True).encode()).hexdigest()
    uri, built = join(output, "report", "index.html"), join(output, "report", "_built")
    if exists(uri, so) and exists(built, so) and read_bytes(built, so).decode() == stamp:
        return uri, False
    status = sorted(_read_parts(join(output, "status"), sorted(folders["status"]), so), key=lambda r: r["video_id"])
    rows = _read_parts(join(output, "summary"), sorted(folders["summary"]), so)
    table = pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA) if rows else SUMMARY_SCHEMA.empty_table()
    summary = {r["video_id"]: r for r in rows}
    fs, report = url_to_fs(join(output, "report"), so)
    try:
        timelines = {os.path.basename(p)[:-4] for p in fs.ls(report, detail=False) if p.endswith(".png")}
    except FileNotFoundError:
        timelines = set()
    write_bytes_atomic(join(output, "report", "circumplex.png"), circumplex_png(table), so)
    n_pages = -(-len(status) // page_size)
    for number in range(1, n_pages + 1):
        chunk = status[(number - 1) * page_size:number * page_size]
        page = inputs_page_html(chunk, summary, timelines, number, n_pages)
        write_bytes_atomic(join(output, "report", page_name(number)), page.encode(), so)
    write_bytes_atomic(uri, index_html(status, summary, page_size).encode(), so)
    write_bytes_atomic(built, stamp.encode(), so)
    return uri, True
