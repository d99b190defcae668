"""The synthetic demo corpus and its media writers; only ``jobs/`` and tests import it."""
