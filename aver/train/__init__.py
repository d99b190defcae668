"""Ray Train jobs: the harness every run shares (``harness``), batching and caches (``batches``), one
face loop for teacher and student (``face``), VGGish (``vggish``) and fusion (``fusion``)."""
