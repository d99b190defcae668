#!/usr/bin/env python
"""Download the images of Google FEC CSVs (many links are dead: each gets a status row).

  python jobs/fetch_fec.py --manifest fec/faceexp-comparison-data-{train,test}-public.csv --output fec/

Writes OUTPUT/images/<sha1(url)[:24]>.<ext> (what the FEC readers look for under images/ beside
the CSV) and OUTPUT/fetch_status/<manifest>.parquet per manifest. Rerunning fetches only what is missing.
"""

from __future__ import annotations

import sys

from aver.cli import main
from aver.pipelines.fetch import FetchConfig, run

if __name__ == "__main__":
    sys.exit(main(FetchConfig, run, __doc__))
