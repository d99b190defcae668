import io

import numpy as np
import pytest
from PIL import Image

from aver.faces import Detection, FaceDetector, FaceDetectorConfig
from tests.media_fixtures import face_patch


@pytest.fixture(scope="module")
def detector():
    return FaceDetector(FaceDetectorConfig(detect_max_side=320), device="cpu")


def _scene(w, h, x, y, face_height=120):
    img = np.full((h, w, 3), 90, np.uint8)
    p = face_patch(face_height)
    img[y:y + p.shape[0], x:x + p.shape[1]] = p
    return img, (x, y, x + p.shape[1], y + p.shape[0])


def test_detects_real_face_in_mixed_batch(detector):
    a, region = _scene(320, 240, 40, 60)
    big, big_region = _scene(1280, 720, 500, 200, face_height=400)  # downscaled for detection
    blank = np.full((240, 320, 3), 90, np.uint8)
    gray = np.asarray(Image.fromarray(a).convert("L"))  # HxW
    rgba = np.asarray(Image.fromarray(a).convert("RGBA"))
    results = detector.detect([a, blank, big, gray, blank, rgba])
    assert [len(r) for r in results] == [1, 0, 1, 1, 0, 1]
    for dets, (x1, y1, x2, y2) in ((results[0], region), (results[2], big_region), (results[3], region),
                                   (results[5], region)):
        bx1, by1, bx2, by2 = dets[0].box
        cx, cy = (bx1 + bx2) / 2, (by1 + by2) / 2
        assert x1 < cx < x2 and y1 < cy < y2  # box centred inside the pasted face, in source pixels
        assert dets[0].prob > 0.95
    assert results[2][0].box[2] - results[2][0].box[0] > 150  # mapped back to full resolution


def test_crop_is_square_and_not_stretched_on_portrait_frames(detector):
    frame = np.zeros((400, 200, 3), np.uint8)
    frame[:, :100] = 255  # left half white
    jpeg = detector.crop(frame, np.array([80.0, 100.0, 120.0, 180.0]))  # tall box near the split
    img = np.asarray(Image.open(io.BytesIO(jpeg)))
    assert img.shape == (140, 140, 3)
    # Square region centred on x=100: left half white, right half black, in equal parts.
    assert img[:, :60].mean() > 200 and img[:, 80:].mean() < 50


def test_crop_outside_frame_is_padded(detector):
    frame = np.full((100, 100, 3), 200, np.uint8)
    img = np.asarray(Image.open(io.BytesIO(detector.crop(frame, np.array([-30.0, -30.0, 30.0, 30.0])))))
    assert img.shape == (140, 140, 3)
    assert img[:40, :40].mean() < 30 and img[-30:, -30:].mean() > 170


def test_rejects_frames_it_cannot_read(detector):
    with pytest.raises(ValueError, match="uint8"):
        detector.detect([np.zeros((50, 50, 3), np.float32)])
    with pytest.raises(ValueError, match="HxW"):
        detector.detect([np.zeros((50, 50, 2), np.uint8)])


def test_config_validation():
    with pytest.raises(ValueError):
        FaceDetectorConfig(min_prob=2)
    with pytest.raises(ValueError):
        FaceDetectorConfig(batch_size=0)


def test_crops_keep_rgb_order(detector):
    # Guards against: BGR/RGB swaps in detection or cropping (grey test images cannot tell).
    img, region = _scene(320, 240, 40, 60)
    img = img.copy()
    img[..., 0] = np.clip(img[..., 0].astype(int) + 80, 0, 255)  # a red cast over everything
    img[..., 2] = img[..., 2] // 2
    (det,) = detector.detect([img])[0][:1]
    crop = np.asarray(Image.open(io.BytesIO(detector.crop(img, det.box))).convert("RGB")).astype(float)
    r, g, b = crop[..., 0].mean(), crop[..., 1].mean(), crop[..., 2].mean()
    assert r > g + 30 and g > b
