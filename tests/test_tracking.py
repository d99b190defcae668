import numpy as np
import pytest

from aver.tracking import FaceTracker, TrackerConfig, box_iou, colour_histogram, histogram_distance
from aver.faces import Detection
from tests.tracking_scenes import SCENES, id_scores, track_scene

MOTION = ("walking", "crossing", "misses", "background")


def test_box_iou_against_the_formula():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 5, 15, 15], [20, 20, 30, 30], [0, 0, 10, 10]])
    assert box_iou(a, b)[0] == pytest.approx([25 / 175, 0.0, 1.0])


@pytest.mark.parametrize("name", MOTION)
def test_motion_links_walking_crossing_misses_and_background_people(name):
    scene = SCENES[name]()
    idf1, switches, ids = id_scores(scene, track_scene(scene, FaceTracker()))
    assert idf1 >= 0.95 and switches == 0 and ids == scene.people, (name, idf1, switches, ids)


def test_a_cut_ends_motion_linking_and_identity_links_across_it():
    scene = SCENES["cut_and_back"]()
    blind = FaceTracker()
    _, switches, _ = id_scores(scene, track_scene(scene, blind, cuts=False))
    assert switches == 2  # without the cut the other person, framed alike, takes the track
    tracker = FaceTracker()
    predicted = track_scene(scene, tracker)
    assert tracker.cuts == [15, 30]
    assert id_scores(scene, predicted)[1:] == (1, 3)  # no id passes to the other person; one returns anew
    assert len(set(tracker.people().values())) == 3  # by motion only: three shots, three people
    linked = FaceTracker()
    predicted = track_scene(scene, linked, identities=True)
    people = linked.people()
    idf1, switches, n = id_scores(scene, [[people.get(t) for t in ids] for ids in predicted])
    assert (idf1, switches, n) == (1.0, 0, 2)


def test_leaving_for_three_seconds_is_a_new_track_that_identity_links_back():
    scene = SCENES["leave_and_return"]()
    tracker = FaceTracker()
    predicted = track_scene(scene, tracker, identities=True)
    assert len(tracker.tracks) == 3
    people = tracker.people()
    assert id_scores(scene, [[people.get(t) for t in ids] for ids in predicted]) == (1.0, 0, 2)


def test_identity_links_need_the_threshold_and_the_margin():
    from aver.tracking import Track, _Kalman

    def run(embeddings):
        tracker = FaceTracker(TrackerConfig(min_frames=1))
        box = np.array([0, 0, 10, 10.0])
        for i, emb in enumerate(embeddings):  # one track each, one after the other
            tracker.tracks.append(Track(i, 10 * i, 10 * i + 5, _Kalman(box), frames=5, identity_sum=np.array(emb)))
        return tracker.people()

    a, b = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    assert run([a, b, a]) == {0: 0, 1: 1, 2: 0}
    assert run([a, b, [np.cos(0.9), 0.0, np.sin(0.9)]])[2] == 0  # cos 0.62 to a, 0 to b: the same as a
    assert run([a, b, [np.cos(1.0), 0.0, np.sin(1.0)]])[2] == 2  # cos 0.54: below the threshold
    assert run([a, b, [1.0, 1.0, 0.0]])[2] == 2  # cos 0.71 to both: no margin, a new person
    assert run([a, a])[1] == 0 and run([a, a, a]) == {0: 0, 1: 0, 2: 0}  # one person leaving twice


def test_short_spurious_tracks_are_not_people_and_low_detections_start_nothing():
    class D:
        def __init__(self, box, prob):
            self.box, self.prob = np.array(box, float), prob

    tracker = FaceTracker()
    assert tracker.update(0, [D([0, 0, 50, 50], 0.99), D([200, 0, 240, 40], 0.8)]) == [0, None]
    assert tracker.update(1, [D([300, 300, 340, 340], 0.95)]) == [1]
    for step in range(2, 5):
        tracker.update(step, [D([2 * step, 0, 50 + 2 * step, 50], 0.75)])  # low, overlapping: extends 0
    assert tracker.tracks[0].frames == 4 and tracker.people() == {0: 0} and tracker.primary() == 0
    with pytest.raises(ValueError, match="in order"):
        tracker.update(4, [])


def test_histogram_distance_of_a_cut_and_of_motion():
    rng = np.random.default_rng(0)
    shot = np.clip(rng.normal(100, 20, (180, 320, 3)), 0, 255).astype(np.uint8)
    moved = np.roll(shot, 12, axis=1)
    other = np.clip(rng.normal(170, 20, (180, 320, 3)), 0, 255).astype(np.uint8)
    same = histogram_distance(colour_histogram(shot), colour_histogram(moved))
    cut = histogram_distance(colour_histogram(shot), colour_histogram(other))
    assert same < 0.05 and cut > TrackerConfig().cut_distance
    assert histogram_distance(colour_histogram(shot), colour_histogram(shot)) == 0.0
    assert histogram_distance(None, colour_histogram(shot)) == 0.0


def test_tracker_picks_persistent_face_not_largest_once():
    tr = FaceTracker()
    small = lambda x: Detection(np.array([x, 50, x + 40, 90.0]), 0.99)  # noqa: E731
    big = Detection(np.array([200, 20, 300, 120.0]), 0.99)
    ids = [tr.update(0, [big, small(10)])]
    for step in range(1, 12):
        ids.append(tr.update(step, [small(10 + 2 * step)]))
    assert len({i[-1] for i in ids}) == 1  # the moving small face keeps one id
    assert tr.primary() == tr.people()[ids[0][1]]
    assert ids[0][0] not in tr.people()  # the big face, seen once, is not a person


def test_tracker_primary_is_the_larger_of_two_faces_always_there():
    # Guards against: a primary track chosen by first appearance, count alone or the smaller face.
    tr = FaceTracker()
    small = Detection(np.array([10, 50, 50, 90.0]), 0.99)
    large = Detection(np.array([200, 20, 300, 120.0]), 0.95)
    for step in range(6):
        ids = tr.update(step, [small, large] if step % 2 else [large, small])
    assert tr.primary() == tr.people()[ids[1 if step % 2 else 0]]
    assert sorted(t.frames for t in tr.tracks) == [6, 6]


def test_tracker_starts_new_track_after_gap_or_jump():
    tr = FaceTracker(TrackerConfig(max_gap=2))
    a = tr.update(0, [Detection(np.array([0, 0, 50, 50.0]), 0.99)])[0]
    b = tr.update(1, [Detection(np.array([200, 200, 250, 250.0]), 0.99)])[0]
    c = tr.update(10, [Detection(np.array([0, 0, 50, 50.0]), 0.99)])[0]
    assert len({a, b, c}) == 3
