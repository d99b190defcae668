import json
import os

from PIL import Image

from tests.ray_helpers import job_module


def test_the_demo_leaves_a_picture_of_every_run_linked_from_its_metrics_table(tmp_path):
    # Guards against: runs without a picture, pictures the metrics table does not link, a rerun
    # that links them twice.
    from aver.pipelines.report import curves_png

    demo = job_module("demo")
    d = demo.Demo(str(tmp_path), 0, "small", 1.0)
    os.makedirs(d.path("models"))
    os.makedirs(d.path("eval"))
    teacher = [{"epoch": e, "steps": 5, "lr": 0.002, "time": 1e9 + e, "loss": 3 - e, "loss_fec": 1 - e / 4,
                "accuracy": 0.2 * e} for e in range(3)]
    fusion = [{"epoch": e, "steps": 4, "lr": 0.001, "time": 1e9 + e, "loss": 1 - e / 10, "ccc_arousal": e / 10,
               "ccc_valence": e / 20} for e in range(4)]
    for name, history in (("teacher128", teacher), ("fusion", fusion)):
        with open(d.path("models", f"{name}.metrics.json"), "w") as f:
            json.dump(history, f)
    with open(d.path("eval", "metrics.md"), "w") as f:
        f.write("| metric | this run |\n|---|---|\n| affectnet_accuracy | 0.5 |\n")
    for _ in range(2):  # a rerun of the demo over its own outputs
        written = demo.training_curves(d)
    assert [os.path.basename(p) for p in written] == ["fusion.png", "teacher128.png"]
    for p in written:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 300
    table = open(d.path("eval", "metrics.md")).read()
    assert table.startswith("| metric | this run |") and table.count("## Training curves") == 1
    assert "- [fusion](curves/fusion.png)\n- [teacher128](curves/teacher128.png)\n" in table
    # one panel for the losses, one per other metric; times and step counts are not curves
    _, drawn = curves_png(teacher, "teacher128")
    assert drawn == ["lr", "loss", "loss_fec", "accuracy"]
