#!/usr/bin/env python
"""Download the images of a Google FEC CSV (many links are dead: each gets a status row).

  python jobs/fetch_fec.py --manifest fec/faceexp-comparison-data-train-public.csv --output fec/

Writes OUTPUT/images/<sha1(url)[:24]>.<ext> (what the FEC readers look for under images/ beside
the CSV) and OUTPUT/fetch_status/<manifest>.parquet. Rerunning fetches only what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys

from aver.fetch import FetchConfig, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="Google FEC CSV (local or fsspec URI)")
    p.add_argument("--output", required=True, help="folder for images/ and fetch_status/")
    p.add_argument("--timeout-s", type=float, default=10.0, help="per-request timeout in seconds (default 10)")
    p.add_argument("--retries", type=int, default=3, help="retries per URL after the first attempt (default 3)")
    p.add_argument("--backoff-s", type=float, default=0.5, help="first retry delay, doubling (default 0.5)")
    p.add_argument("--workers", type=int, default=16, help="concurrent downloads (default 16)")
    p.add_argument("--max-bytes", type=int, default=20 * 2**20, help="refuse larger responses (default 20 MiB)")
    p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    p.add_argument("--allow-file-urls", action="store_true",
                   help="also copy file:// URLs (local files; the offline demo corpus uses them)")
    a = p.parse_args(argv)
    run(FetchConfig(manifest=a.manifest, output=a.output, timeout_s=a.timeout_s, retries=a.retries,
                    backoff_s=a.backoff_s, workers=a.workers, max_bytes=a.max_bytes, storage_options=a.storage_options,
                    allow_file_urls=a.allow_file_urls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
