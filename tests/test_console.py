import os
import re
import shutil

import pytest

from aver.console import Progress, duration
from tests.media_fixtures import face_video
from tests.ray_helpers import run_job


def test_progress_lines_count_rate_and_time_left_without_a_terminal(capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr("aver.console.time.monotonic", lambda: now[0])
    bar = Progress("distill", 4, every_s=5)
    now[0] = 10.0
    bar.update()  # a line: 1 of 4 at 0.1/s, 30 s left
    now[0] = 12.0
    bar.update()  # 2 s after the last line: none
    now[0] = 20.0
    bar.update(2)
    now[0] = 40.0
    assert bar.close() == 40.0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["distill: 1/4 inputs (25 %), 0.1/s, ETA 30s", "distill: 4/4 inputs (100 %), 0.2/s",
                     "distill: 4/4 inputs (100 %), 0.1/s"]
    assert [duration(s) for s in (5, 185, 3720)] == ["5s", "3m05s", "1h02m"]


@pytest.mark.timeout(300)
def test_a_job_prints_its_stages_progress_and_summary_not_rays_logs(tmp_path):
    # Guards against: Ray's INFO/WARNING lines, its Data progress blocks and its (pid=...) prefixes on the
    # terminal, and a job that ends without saying what it did.
    face_video(tmp_path / "in" / "v.mp4", seconds=1.0)
    (tmp_path / "in" / "broken.mp4").write_bytes(b"junk")
    ray_tmp = f"/tmp/aver-console-{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
    try:
        out = run_job(["jobs/extract_faces.py", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                       "--actors", "1", "--cpus-per-actor", "0.5"], env={"RAY_TMPDIR": ray_tmp})
        _check_terminal(out, tmp_path, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _check_terminal(out, tmp_path, ray_tmp: str) -> None:
    printed = (out.stdout + out.stderr).splitlines()
    assert out.returncode == 0, "\n".join(printed[-40:])
    noise = [line for line in printed if re.search(r"\b(INFO|WARNING|DEBUG)\b|\(pid=|pid=\d+\)|Running Dataset|"
                                                   r"logging_progress|core_worker|Traceback", line)]
    assert not noise, noise
    assert any(re.fullmatch(r"extract_faces: 2/2 inputs \(100 %\), [\d.]+/s", line) for line in printed), printed
    summary = [line for line in printed if line.startswith("extract_faces: corrupt=1, ok=1 (2 inputs in ")]
    assert len(summary) == 1 and f"outputs in {tmp_path / 'out'}" in summary[0] and "; logs in " in summary[0]
    assert any(re.match(r"  broken-\w+: corrupt - cannot decode", line) for line in printed)  # the failed input, named
    assert len(printed) <= 8, printed
    logs = summary[0].split("; logs in ")[1]
    assert logs.startswith(ray_tmp)
    with open(f"{logs}/aver-driver.log") as f:  # what left the terminal is in the session's logs
        assert "INFO" in f.read()
