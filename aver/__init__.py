"""aver: audio-visual emotion recognition (Schoneveld et al. 2021) as batch jobs on Ray.

Importing aver starts no Ray, reads no file and downloads nothing; submodules are imported
explicitly (``aver.models``, ``aver.audio``, ``aver.losses``, ``aver.metrics``, ...).
"""

__version__ = "0.1.0"

