"""Storage and media: fsspec access with atomic writes and redaction (``storage``), Parquet parts and
status tables (``parts``), listing and decoding of inputs (``media``), streaming helpers."""
