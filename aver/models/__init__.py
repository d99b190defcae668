"""The paper's four networks (SPEC §3) and their checkpoints."""

from aver.models._base import autocast, resize_faces, to_device
from aver.models.checkpoint import load_checkpoint, save_checkpoint, skip_init
from aver.models.fusion import FusionConfig, FusionModel
from aver.models.identity import IdentityNet
from aver.models.mtcnn import MTCNN
from aver.models.student import Student, StudentConfig, StudentOutput
from aver.models.teacher import FaceOutput, Teacher, TeacherConfig
from aver.models.vggish import AudioOutput, VGGishConfig, VGGishEmotion
from aver.models.weights import WEIGHTS, same_weights

__all__ = [
    "AudioOutput", "FaceOutput", "FusionConfig", "FusionModel", "IdentityNet", "MTCNN", "Student", "StudentConfig", "StudentOutput",
    "Teacher", "TeacherConfig", "VGGishConfig", "VGGishEmotion", "load_checkpoint", "same_weights",
    "save_checkpoint", "skip_init", "WEIGHTS", "autocast", "resize_faces", "to_device",
]
