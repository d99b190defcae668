"""The demo corpus: deterministic, in the real layouts, read by the real readers."""

import csv
import hashlib
import os

import numpy as np
import pytest

from aver.data.manifests import read_affectnet, read_arff, read_fec, read_recola
from aver.io.media import VideoReader, read_audio
from aver.demo.corpus import PROTOTYPES, Identity, draw_face, expression_from_affect, sample_expression


@pytest.fixture(scope="module")
def corpus(small_corpus):
    """The suite's corpus (size small, seed 7; its FEC images fetched beside the CSVs)."""
    return small_corpus


def _digest(path):
    return hashlib.sha1(open(path, "rb").read()).hexdigest()


def test_corpus_is_deterministic_for_a_seed(corpus, tmp_path):
    # Each item draws from its own random stream (seed, kind, index), so drawing some items again,
    # alone and in another process than the corpus's pool, must give the suite's corpus byte for byte.
    from aver.demo.corpus import SIZES, _affectnet_part, _fec_part, _recola_session

    again = tmp_path / "again"
    for sub in ("fec/source", "recola/recordings_audio", "recola/recordings_video",
                "recola/ratings_gold_standard/arousal", "recola/ratings_gold_standard/valence"):
        os.makedirs(again / sub)
    rows = _affectnet_part(str(again), 7, "training", range(3, 6))
    with open(corpus / "affectnet/training.csv", newline="") as f:
        assert [[str(v) for v in r] for r in rows] == list(csv.reader(f))[4:7]  # rows 3-5 after the header
    _recola_session(str(again), 7, "train", 1, SIZES["small"].session_s)
    for rel in ("affectnet/Manually_Annotated_Images/tra000/training_00005.jpg",
                "recola/ratings_gold_standard/valence/train_1.arff", "recola/recordings_audio/train_1.wav",
                "recola/recordings_video/train_1.mp4"):
        assert _digest(corpus / rel) == _digest(again / rel), rel
    fec = (corpus / "fec/faceexp-comparison-data-train-public.csv").read_text().replace(str(corpus), "")
    assert "\n".join(_fec_part(str(again), 7, "train", range(2))).replace(str(again), "") == \
        "\n".join(fec.splitlines()[:2])


def test_affectnet_layout(corpus):
    m = read_affectnet(str(corpus / "affectnet" / "training.csv"),
                       images_root=str(corpus / "affectnet" / "Manually_Annotated_Images"))
    assert len(m.records) == 96 and not m.rejected
    assert sorted(set(r["label"] for r in m.records)) == list(range(8))
    assert all(os.path.exists(r["source"]) for r in m.records)


def test_fec_layout_and_majority(corpus):
    m = read_fec(str(corpus / "fec" / "faceexp-comparison-data-train-public.csv"))
    assert len(m.records) + len(m.rejected) == 60 and len(m.records) >= 50
    assert {r["type"] for r in m.records} == {0, 1, 2}
    assert all(f["url"].startswith("file://") for r in m.records for f in r["faces"])


def test_recola_layout(corpus):
    m = read_recola(str(corpus / "recola"))
    assert [r["name"] for r in m.records] == ["dev_1", "train_1", "train_2"]
    times, values, bad = read_arff(m.records[1]["arousal_arff"])
    assert bad == 0 and len(times) == 300 and times[1] == pytest.approx(0.04)
    assert max(abs(v) for v in values) <= 0.8 + 1e-6
    with VideoReader(m.records[1]["video"]) as r:
        assert r.has_audio and len(list(r.frames(5))) == 60 and r.decoded_s == pytest.approx(12.0, abs=0.3)
    assert abs(read_audio(m.records[1]["audio"]).size - 12 * 16000) < 1024


def test_recola_reader_reports_incomplete_sessions(corpus, tmp_path):
    import shutil

    shutil.copytree(corpus / "recola", tmp_path / "r")
    os.remove(tmp_path / "r" / "ratings_gold_standard" / "valence" / "train_2.arff")
    m = read_recola(str(tmp_path / "r"))
    assert [r["name"] for r in m.records] == ["dev_1", "train_1"]
    assert m.rejected[0]["line"] == "train_2"


def test_expression_carries_the_label_not_identity():
    rng = np.random.default_rng(0)
    # Same expression, different identities differ; same identity, different expressions differ
    # mainly in the mouth/eye region.
    ident = Identity.random(rng)
    happy = draw_face(PROTOTYPES[1], ident, 120).astype(float)
    sad = draw_face(PROTOTYPES[2], ident, 120).astype(float)
    diff = np.abs(happy - sad).mean(axis=2)
    assert diff[80:, :].mean() > 3 * diff[:30, :].mean()  # mouth area changes, forehead does not
    samples = np.stack([sample_expression(3, rng) for _ in range(200)])
    assert np.argmin(np.linalg.norm(PROTOTYPES - samples.mean(0), axis=1)) == 3
    assert expression_from_affect(0.8, 0.0)[0] > 0.5 and expression_from_affect(0.0, 0.8)[4] > 0.5


def test_session_backgrounds_stand_apart_from_the_skin_and_nothing_else_moves():
    # Guards against (issue 32): a dark face before a background of its own shade, found by MTCNN in
    # 14 % of a session's frames.
    from aver.demo.corpus import SESSION_CONTRAST, _luma, _session, apart_from_skin

    rng = np.random.default_rng(3)
    for _ in range(2000):
        ident = Identity.random(rng)
        moved = apart_from_skin(ident)
        assert abs(_luma(moved.background) - _luma(moved.skin)) >= SESSION_CONTRAST - 1 \
            or {0, 255} & set(moved.background)  # no room either side: clipped as far as it goes
        assert (moved.skin, moved.hair, moved.width, moved.eye_spacing) == (ident.skin, ident.hair, ident.width,
                                                                           ident.eye_spacing)
        if abs(_luma(ident.background) - _luma(ident.skin)) >= SESSION_CONTRAST:
            assert moved == ident
    from aver.demo.corpus import _rng

    _, _, ident, _ = _session(_rng(7, 5, 3), 1.0)  # seed 7's dev_3: skin luma 93 before 69 as drawn
    assert abs(_luma(ident.background) - _luma(ident.skin)) >= SESSION_CONTRAST - 1
