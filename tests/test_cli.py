"""Command lines built from the config dataclasses: flags, defaults and help come from the fields."""

import dataclasses
import os

import pytest

from aver.cli import field_docs, parse, parser_for
from aver.faces import FaceDetectorConfig
from aver.faults import RetryPolicy
from aver.pipelines.distill import DistillConfig
from aver.pipelines.score import ScoreVideosConfig
from aver.train.face import TeacherTrainConfig
from aver.train.fusion import FusionTrainConfig
from aver.train.vggish import VGGishTrainConfig


def test_defaults_are_the_dataclass_defaults():
    # Guards against a CLI restating (and drifting from) a config's defaults.
    cfg = parse(ScoreVideosConfig, ["--input", "in", "--output", "out", "--model", "m"])
    assert cfg == ScoreVideosConfig(input="in", output="out", model="m")
    assert cfg.detector == FaceDetectorConfig() and cfg.retry == RetryPolicy()


def test_nested_tuple_and_json_flags_reach_the_config():
    cfg = parse(ScoreVideosConfig, ["--input", "i", "--output", "o", "--model", "m", "--detector-min-prob", "0.5",
                                    "--detector-thresholds", "0.1", "0.2", "0.3", "--retry-attempts", "7",
                                    "--storage-options", '{"anon": true}', "--all-faces", "--batch-size", "3",
                                    "--detector-batch-size", "5"])
    assert cfg.detector.min_prob == 0.5 and cfg.detector.thresholds == (0.1, 0.2, 0.3)
    assert cfg.detector.batch_size == 5 and cfg.batch_size == 3  # same field name, two configs
    assert cfg.retry.attempts == 7 and cfg.all_faces and cfg.storage_options == {"anon": True}
    d = parse(DistillConfig, ["--input", "i", "s3://b/j", "--output", "o", "--teachers", "s3://b/a.pt", "s3://b/b.pt"])
    assert d.teachers == ("s3://b/a.pt", "s3://b/b.pt") and d.input == (os.path.abspath("i"), "s3://b/j")
    f = parse(FusionTrainConfig, ["--output", "o", "--recola", "r", "--student", "s", "--vggish-arousal", "a",
                                  "--vggish-valence", "v", "--variants", "fused", "audio"])
    assert f.variants == ("fused", "audio") and f.name == "fusion+fusion_audio" and f.epochs == 20
    assert f.named_variants() == {"fusion": ("visual", "audio"), "fusion_audio": ("audio",)}


def test_job_defaults_live_in_the_config_subclass():
    t = parse(TeacherTrainConfig, ["--output", "o", "--affectnet", "a.csv", "--fec", "f.csv", "--freeze", "trunk"])
    assert t.name == "teacher128" and t.freeze == "trunk" and t.named_variants() == {"teacher128": 128}
    both = parse(TeacherTrainConfig, ["--output", "o", "--affectnet", "a.csv", "--fec", "f.csv", "--d-face", "128", "256"])
    assert both.name == "teacher128+teacher256" and both.named_variants() == {"teacher128": 128, "teacher256": 256}
    v = parse(VGGishTrainConfig, ["--output", "o", "--recola", "r", "--dimension", "valence"])
    assert v.name == "vggish_valence" and v.lr == 1e-4 and v.batch_size == 8
    # one variant may be renamed; several are published under their own names
    assert parse(VGGishTrainConfig, ["--output", "o", "--recola", "r", "--name", "mine"]).named_variants() == \
        {"mine": "arousal"}
    assert parse(VGGishTrainConfig, ["--output", "o", "--recola", "r", "--name", "run", "--dimension", "arousal",
                                     "valence"]).named_variants() == {"vggish_arousal": "arousal", "vggish_valence": "valence"}


def test_bad_values_are_a_usage_error_with_the_configs_message(capsys):
    with pytest.raises(SystemExit) as e:
        parse(ScoreVideosConfig, ["--input", "i", "--output", "o", "--model", "m", "--fps", "0"])
    assert e.value.code == 2 and "fps must be in (0, 120]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # choices come from field metadata
        parse(TeacherTrainConfig, ["--output", "o", "--affectnet", "a", "--fec", "f", "--lr-schedule", "step"])
    with pytest.raises(SystemExit):  # a required field is a required flag
        parse(ScoreVideosConfig, ["--input", "i", "--output", "o"])


def test_help_documents_every_field_with_its_docstring():
    text = parser_for(ScoreVideosConfig).format_help()
    docs = field_docs(ScoreVideosConfig)
    for f in dataclasses.fields(ScoreVideosConfig):
        if dataclasses.is_dataclass(f.type) or f.name in ("detector", "tracker", "retry"):
            continue
        assert "--" + f.name.replace("_", "-") in text
        assert docs[f.name].split()[0] in text
    assert "--detector-min-prob" in text and "(default 0.7)" in text and "--tracker-max-gap" in text
    assert "--fail-at" not in parser_for(TeacherTrainConfig).format_help()  # testing-only flag stays hidden


def _help_of(config, flag: str) -> str:
    action = next(a for a in parser_for(config)._actions if flag in a.option_strings)
    return action.help


@pytest.mark.parametrize("config, flag, says", [
    ("aver.train.face:TeacherTrainConfig", "--affectnet", "Manually_Annotated_file_lists/training.csv"),
    ("aver.train.face:StudentTrainConfig", "--affectnet-images", "beside the CSV's folder"),
    ("aver.train.face:StudentTrainConfig", "--fec", "images/ beside it"),
    ("aver.train.face:TeacherTrainConfig", "--fec-images", "images/ beside the CSV"),
    ("aver.pipelines.distill:DistillConfig", "--images-root", "Manually_Annotated_Images/ beside the CSV"),
    ("aver.pipelines.evaluate:EvaluateConfig", "--data", "Manually_Annotated_file_lists/"),
    ("aver.pipelines.evaluate:EvaluateConfig", "--affectnet-images", "Manually_Annotated_Images/"),
    ("aver.train.vggish:VGGishTrainConfig", "--recola", "ratings_gold_standard/{arousal,valence}/*.arff"),
    ("aver.train.fusion:FusionTrainConfig", "--recola", "AVEC 2016"),
    ("aver.pipelines.fetch:FetchConfig", "--output", "images/ beside the CSV"),
])
def test_help_says_the_layout_each_dataset_flag_expects(config, flag, says):
    import importlib

    module, name = config.split(":")
    assert says in _help_of(getattr(importlib.import_module(module), name), flag)
