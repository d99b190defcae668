"""A batch job's stages run in this process, without Ray: load -> model -> commit, the records
handed on as the stages would (for the tests that look inside one unit)."""

from __future__ import annotations

from aver.pipelines.ledger import Unit


def run_unit(unit: Unit, cfg, load, model_stage, commit) -> list[dict]:
    """The status rows of ``unit`` after its records went through ``model_stage`` (an instance) and
    ``commit``, which reads them as often as it likes."""
    made = load(unit, cfg)
    records = [made] if not hasattr(made, "__next__") else list(made)
    for i, r in enumerate(records):
        r.segment, r.last = i, i == len(records) - 1
    model_stage.run([r for r in records if r.failure is None])
    for r in records:
        for key in model_stage.consumed:
            if hasattr(r, key):
                setattr(r, key, None)
    return commit(unit, lambda: iter(records), cfg)
