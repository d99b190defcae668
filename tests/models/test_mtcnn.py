"""The batched MTCNN against facenet-pytorch's own ``detect_face`` (same networks and weights), the
device crops against PIL's, and the host round trips of one detector call."""

import numpy as np
import pytest
import torch
from PIL import Image

from aver.faces import FaceDetector, FaceDetectorConfig, crop_face, detect_frames
from aver.io.media import VideoFrame
from aver.models.mtcnn import MTCNN


@pytest.fixture(scope="module")
def mtcnn():
    return MTCNN()


def _photo_faces() -> list[np.ndarray]:
    from skimage import data

    grey = [np.repeat((f * 255).astype(np.uint8)[..., None], 3, 2) for f in data.lfw_subset()[:100:7]]
    return [data.astronaut()[30:210, 140:310], np.repeat(data.camera()[40:260, 150:330, None], 3, 2)] + grey


def _backgrounds(rng, h, w):
    from skimage import data

    textures = [data.coffee(), data.chelsea(), np.repeat(data.brick()[..., None], 3, 2), data.rocket()]
    noise = rng.integers(20, 230, (h // 8, w // 8, 3), dtype=np.uint8)
    yield np.asarray(Image.fromarray(noise).resize((w, h), Image.BILINEAR))
    yield np.full((h, w, 3), rng.integers(40, 200, 3), np.uint8)
    for t in textures:
        y, x = (int(rng.integers(0, max(1, t.shape[k] - (h, w)[k] // 2))) for k in (0, 1))
        yield np.asarray(Image.fromarray(np.ascontiguousarray(t[y:, x:])).resize((w, h), Image.BILINEAR))


def composited(n: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    """Real faces (scikit-image's photos) pasted on varied backgrounds at varied scales and places."""
    rng = np.random.default_rng(seed)
    faces, frames = _photo_faces(), []
    while len(frames) < n:
        for bg in _backgrounds(rng, h, w):
            img, taken = bg.copy(), []
            for _ in range(int(rng.integers(2, 10))):
                f = faces[rng.integers(len(faces))]
                side = int(rng.integers(28, min(h, w) // 3))
                f = np.asarray(Image.fromarray(f).resize((side, round(side * f.shape[0] / f.shape[1]))))
                y, x = int(rng.integers(0, h - f.shape[0])), int(rng.integers(0, w - f.shape[1]))
                if any(y < b and y + f.shape[0] > a and x < d and x + f.shape[1] > c for a, b, c, d in taken):
                    continue  # faces side by side, not on top of each other
                img[y:y + f.shape[0], x:x + f.shape[1]] = f
                taken.append((y, y + f.shape[0], x, x + f.shape[1]))
            frames.append(img)
    return frames[:n]


def nested(n: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    """A large face with a small one inside its box (a picture on a shirt, a face on a screen
    behind): O-Net's last NMS, which measures overlap against the smaller box, keeps one of them."""
    rng, faces, frames = np.random.default_rng(seed), _photo_faces(), []
    for bg in (b for _ in range(n) for b in _backgrounds(rng, h, w)):
        img = bg.copy()
        big = faces[rng.integers(2)]
        side = int(rng.integers(min(h, w) // 2, min(h, w) - 10))
        k = side / max(big.shape[:2])
        big = np.asarray(Image.fromarray(big).resize((round(k * big.shape[1]), round(k * big.shape[0]))))
        y, x = int(rng.integers(0, h - big.shape[0] + 1)), int(rng.integers(0, w - big.shape[1] + 1))
        img[y:y + big.shape[0], x:x + big.shape[1]] = big
        small = faces[rng.integers(len(faces))]
        s = int(rng.integers(side // 5, side // 3))
        small = np.asarray(Image.fromarray(small).resize((s, s)))
        sy, sx = y + int(rng.integers(0, big.shape[0] - s)), x + int(rng.integers(0, big.shape[1] - s))
        img[sy:sy + s, sx:sx + s] = small
        frames.append(img)
    return frames[:n]


def demo_frames(n: int, seed: int) -> list[np.ndarray]:
    """The demo corpus's faces: its labelled pictures and its recording sessions' frames."""
    from aver.demo.corpus import _labelled_face, _session, _session_frames

    rng = np.random.default_rng(seed)
    pictures = [_labelled_face(rng, int(rng.integers(8)))[0] for _ in range(n // 2)]
    valence, arousal, identity, _ = _session(rng, 8.0)
    sessions = [f for i, f in enumerate(_session_frames(valence, arousal, identity, rng)) if i % 5 == 0]
    return pictures + sessions[:n - len(pictures)]


def _upstream(mtcnn, frames):
    from facenet_pytorch.models.utils.detect_face import detect_face

    with torch.no_grad():
        boxes, _ = detect_face(np.stack(frames), mtcnn.min_face_size, mtcnn.pnet, mtcnn.rnet, mtcnn.onet,
                               list(mtcnn.thresholds), mtcnn.factor, torch.device("cpu"))
    return [np.asarray(b, np.float64).reshape(-1, 5) for b in boxes]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def test_batched_mtcnn_agrees_with_facenet_pytorch(mtcnn):
    # Guards against: crops resampled otherwise than upstream's area interpolation (roi_align
    # matched 95 % of the boxes, probabilities off by up to 0.09), NMS criteria or thresholds
    # changed, the pyramid's scales drifting, boxes regressed in another order.
    demo = demo_frames(40, 0)
    groups = {"composited": [composited(16, 240, 320, seed) for seed in range(8)] + [composited(4, 360, 640, 8)],
              "nested": [nested(16, 240, 320, seed) for seed in (9, 10)],
              "demo": [[f for f in demo if f.shape == shape] for shape in {f.shape for f in demo}]}
    total = 0
    for name, batches in groups.items():  # each kind of scene meets the bounds on its own
        n_ref = matched = extra = 0
        worst_prob = 0.0
        for frames in batches:
            boxes, probs, index = mtcnn(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2))
            ours = torch.cat([boxes, probs[:, None]], 1).numpy().astype(np.float64)
            for k, ref in enumerate(_upstream(mtcnn, frames)):
                mine = ours[index.numpy() == k]
                n_ref += len(ref)
                if not len(mine):
                    continue
                if not len(ref):
                    extra += len(mine)
                    continue
                iou = _iou(ref, mine)
                best = iou.argmax(1)
                hit = iou[np.arange(len(ref)), best] >= 0.9
                matched += int(hit.sum())
                if hit.any():
                    worst_prob = max(worst_prob, float(np.abs(ref[hit, 4] - mine[best[hit], 4]).max()))
                extra += int((iou.max(0) < 0.9).sum())
        assert matched >= 0.99 * n_ref and extra <= 0.01 * n_ref and worst_prob <= 0.01, (name, n_ref, matched, extra)
        total += n_ref
    assert total >= 500


def test_device_crops_match_pil(mtcnn):
    # Guards against: crops cut at other places, resized without antialiasing, or the black
    # padding outside the frame lost; and the student seeing different faces than before.
    from aver.models import Student

    detector = FaceDetector(FaceDetectorConfig(), device="cpu")
    # faces from 28 px (enlarged) to 700 px (shrunk 5x: antialiasing matters) in frames up to 720p
    frames = composited(12, 240, 320, 20) + nested(3, 720, 1280, 21) + demo_frames(8, 1)[:4]
    found = detector.detect(frames)
    boxes = [[d.box for d in dets] for dets in found]
    edge = np.array([-30.0, 150.0, 60.0, 260.0])  # partly outside: padded black
    mine = detector.crops(frames + [frames[0]], boxes + [[edge]]).permute(0, 2, 3, 1).numpy()
    ref = np.stack([crop_face(f, b) for f, bs in zip(frames + [frames[0]], boxes + [[edge]]) for b in bs])
    assert len(ref) >= 20 and mine.shape == ref.shape
    diff = np.abs(mine.astype(int) - ref.astype(int))
    assert diff.mean(axis=(1, 2, 3)).max() <= 2  # every crop
    # on the CPU the kernel is PIL's own algorithm: within 1 almost everywhere (unfiltered: 71 %)
    assert (diff <= 1).mean(axis=(1, 2, 3)).min() >= 0.99
    torch.manual_seed(0)
    student = Student().eval()
    with torch.no_grad():
        a = student(Student.preprocess(ref)).embedding
        b = student(Student.preprocess(torch.from_numpy(mine).permute(0, 3, 1, 2))).embedding
    assert torch.nn.functional.cosine_similarity(a, b).min() >= 0.99


class _HostTransfers(torch.overrides.TorchFunctionMode):
    """Counts what makes the host wait for the device: tensors converted to host objects."""

    NAMES = {"cpu", "item", "numpy", "tolist", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _crowd(n_faces: int) -> np.ndarray:
    from tests.media_fixtures import face_patch

    frame = np.full((400, 640, 3), 110, np.uint8)
    patch = face_patch(56)
    for k in range(n_faces):
        y, x = 8 + (k // 10) * 78, 4 + (k % 10) * 63
        frame[y:y + patch.shape[0], x:x + patch.shape[1]] = patch[:, :60]
    return frame


def test_a_detector_call_returns_to_the_host_a_fixed_number_of_times():
    # Guards against: upstream's per-box loops (crops, pads, NMS through NumPy) planted back: each
    # costs a host round trip per candidate, a GPU waits on every one.
    detector = FaceDetector(FaceDetectorConfig(), device="cpu")
    counts = {}
    for n_faces in (1, 50):
        frame = _crowd(n_faces)
        frames = [VideoFrame(k, k / 5, frame, None, False) for k in range(4)]
        with _HostTransfers() as seen:
            found, crops = detect_frames(detector, frames)
        assert all(len(f) >= 0.9 * n_faces for f in found) and len(crops) == sum(map(len, found))
        counts[n_faces] = seen.count
    assert counts[1] == counts[50] <= 4
