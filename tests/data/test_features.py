import numpy as np
import torch

from aver.data.features import audio_timeline, chunked_frame_features, student_features, take
from aver.models import Student, VGGishEmotion


def test_take_keeps_the_window_half_open():
    times = np.arange(10) * 0.5
    values = np.arange(10, dtype=np.float32)[:, None]
    # [1.0, 3.0): times 1.0 .. 2.5, never 3.0, resampled by nearest index to 5 rows
    assert take(times, values, 1.0, 3.0, 5)[:, 0].tolist() == [2, 2, 3, 4, 5]
    assert take(times, values, 0.0, 0.5, 2)[:, 0].tolist() == [0, 0]


def test_audio_timeline_steps_and_short_audio():
    torch.manual_seed(0)
    nets = [VGGishEmotion(hidden_dim=16).eval(), VGGishEmotion(hidden_dim=16).eval()]
    short = audio_timeline(np.zeros(int(0.28 * 16000), np.float32), 16000, nets)  # 7 frames of 40 ms
    assert short.times.shape == (0,) and short.features.shape == (0, 256)
    one = audio_timeline(np.random.default_rng(0).standard_normal(int(0.32 * 16000)).astype(np.float32), 16000, nets)
    assert one.times.tolist() == [0.0] and one.features.shape == (1, 256)  # 8 frames: one 0.32 s step
    longer = audio_timeline(np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32), 16000, nets)
    assert np.allclose(longer.times, np.arange(6) * 0.32)


def test_vggish_in_bounded_chunks_equals_one_forward_over_the_whole_recording():
    # Guards against: a chunk boundary without enough context (features near every boundary would
    # differ), the wrong output offset of a chunk, or a lost or doubled step at the end.
    torch.manual_seed(0)
    net = VGGishEmotion(hidden_dim=16).eval()
    for frames in (1003, 96, 8):  # not a multiple of 8; exactly a few chunks; one step
        mel = torch.randn(frames, 128)
        with torch.no_grad():
            whole = net.frame_features(mel[None, None])[0].numpy()
        for chunk in (16, 64, 4096):
            got = chunked_frame_features(net, mel, chunk)
            assert got.shape == whole.shape == (frames // 8, 128)
            assert np.allclose(got, whole, atol=1e-5), (frames, chunk, np.abs(got - whole).max())


def test_student_features_of_no_crops():
    emb, probs = student_features(Student().eval(), [])
    assert emb.shape == (0, 1920) and probs.shape == (0, 8)


def test_fusion_windows_are_cut_from_features_centred_per_recording(small_corpus, tmp_path):
    # Guards against: fusion fed raw embeddings, where who is on screen outweighs what the face does
    # (decisions.md, issue 15): each recording's own mean face (over frames with one) and mean voice
    # come out before windows are cut, and frames without a face stay zero.
    import io

    from aver.data.features import centred
    from aver.data.manifests import read_recola
    from aver.data.recola import SessionFeaturizer, SessionWindows, session_labels
    from aver.constants import LABEL_STEP_S

    rng = np.random.default_rng(0)
    record = next(r for r in read_recola(str(small_corpus / "recola")).records if r["split"] == "dev")
    n_vis, n_aud = 60, 37
    vis = rng.normal(3.0, 1.0, (n_vis, 1920)).astype(np.float32)
    vis[::4] = 0  # no face on every fourth frame
    aud = rng.normal(-2.0, 1.0, (n_aud, 256)).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, visual_times=np.arange(n_vis) * 0.2, visual=vis, audio_times=np.arange(n_aud) * 0.32, audio=aud)
    (tmp_path / f"{record['name']}.npz").write_bytes(buf.getvalue())
    cfg = SessionWindows(recola=str(small_corpus / "recola"), student="s", vggish_arousal="a", vggish_valence="v",
                         window_s=4.8, hop_s=1.2, features_cache=str(tmp_path))
    out = SessionFeaturizer(cfg)({k: [record[k]] for k in record})
    present = np.abs(vis).sum(1) > 0
    expected_vis, expected_aud = centred(vis, present), centred(aud)
    assert np.allclose(expected_vis[present].mean(0), 0, atol=1e-4) and not expected_vis[~present].any()
    assert np.allclose(expected_vis[present], vis[present] - vis[present].mean(0), atol=1e-5)
    duration = len(session_labels(record)) * LABEL_STEP_S
    n = int(np.floor((duration - 4.8) / 1.2 + 1e-9)) + 1
    assert len(out["visual"]) == n
    assert np.allclose(out["visual"][1], take(np.arange(n_vis) * 0.2, expected_vis, 1.2, 6.0, 24))
    assert np.allclose(out["audio"][1], take(np.arange(n_aud) * 0.32, expected_aud, 1.2, 6.0, 15))
