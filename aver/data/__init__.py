"""Readers of the real datasets' manifests (``manifests``), Ray Datasets of face crops (``faces``),
RECOLA sessions and fusion windows (``recola``) and the feature timelines fusion reads (``features``)."""
