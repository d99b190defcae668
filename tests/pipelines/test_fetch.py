import http.server
import threading

import pyarrow.parquet as pq
import pytest

from aver.data.manifests import fec_image_name
from aver.pipelines.fetch import FetchConfig, run


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: dict = {}

    def do_GET(self):  # noqa: N802
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path.startswith("/ok"):
            body = b"\xff\xd8jpeg-bytes" + self.path.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/flaky") and self.hits[self.path] < 2:
            self.send_response(503)
            self.end_headers()
        elif self.path.startswith("/flaky"):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"recovered")
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Handler.hits = {}
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_serves_some_fails_others_and_reruns(tmp_path, server):
    urls = [f"{server}/ok/1.jpg", f"{server}/flaky/2.jpg", f"{server}/gone/3.jpg", "ftp://x/4.jpg",
            f"{server}/ok/5.png", f"{server}/ok/6.jpg"]
    row = lambda a, b, c: f"{a},0,1,0,1,{b},0,1,0,1,{c},0,1,0,1,ONE_CLASS_TRIPLET,r1,1\n"  # noqa: E731
    csv = tmp_path / "fec.csv"
    csv.write_text(row(*urls[:3]) + row(*urls[3:]) + "bad,row\n")
    test_csv = tmp_path / "fec_test.csv"  # a second manifest naming two of the same images and a new one
    test_csv.write_text(row(urls[0], urls[4], f"{server}/ok/7.jpg"))
    cfg = FetchConfig(manifest=(str(csv), str(test_csv)), output=str(tmp_path), timeout_s=5, retries=2,
                      backoff_s=0.01, workers=4)
    assert run(cfg) == {"ok": 5, "failed": 2, "rejected_rows": 1}
    assert _Handler.hits["/ok/1.jpg"] == 1  # named by both manifests, fetched once
    its_own = pq.read_table(tmp_path / "fetch_status" / "fec_test.parquet").to_pandas()
    assert sorted(its_own["url"]) == sorted([urls[0], urls[4], f"{server}/ok/7.jpg"])
    status = pq.read_table(tmp_path / "fetch_status" / "fec.parquet").to_pandas().set_index("url")
    assert len(status) == 6
    assert status.loc[f"{server}/gone/3.jpg", "error"] == "HTTP 404"
    assert status.loc[f"{server}/gone/3.jpg", "attempts"] == 1  # dead links are not retried
    assert status.loc[f"{server}/flaky/2.jpg", "attempts"] == 2
    assert "only http" in status.loc["ftp://x/4.jpg", "error"]
    assert (tmp_path / "images" / fec_image_name(f"{server}/ok/1.jpg")).read_bytes().endswith(b"/ok/1.jpg")
    before = dict(_Handler.hits)
    assert run(cfg)["ok"] == 5
    with pytest.raises(ValueError, match="one file name"):
        FetchConfig(manifest=(str(csv), str(tmp_path / "other" / "fec.csv")), output=str(tmp_path))
    assert _Handler.hits["/ok/1.jpg"] == before["/ok/1.jpg"]  # already fetched: not downloaded again


def test_file_urls_only_when_allowed(tmp_path):
    secret = tmp_path / "private.jpg"
    secret.write_bytes(b"\xff\xd8 a local file the manifest must not copy")
    url = secret.as_uri()
    (tmp_path / "fec.csv").write_text(f"{url},0,1,0,1,{url},0,1,0,1,{url},0,1,0,1,ONE_CLASS_TRIPLET,r1,1\n")
    cfg = dict(manifest=str(tmp_path / "fec.csv"), output=str(tmp_path / "out"), retries=0)
    assert run(FetchConfig(**cfg)) == {"ok": 0, "failed": 1, "rejected_rows": 0}
    assert not (tmp_path / "out" / "images").exists()
    status = pq.read_table(tmp_path / "out" / "fetch_status" / "fec.parquet").to_pylist()
    assert "--allow-file-urls" in status[0]["error"]
    assert run(FetchConfig(**cfg, allow_file_urls=True))["ok"] == 1
    assert (tmp_path / "out" / "images" / fec_image_name(url)).read_bytes() == secret.read_bytes()
