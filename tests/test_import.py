import subprocess
import sys


def test_importing_every_module_starts_nothing_reads_nothing_and_touches_no_network():
    # Guards against: a module-level ray.init(), weight or data loading, or a download at import,
    # in any module of aver (every one is imported, in a fresh interpreter).
    code = (
        "import builtins, io, pkgutil, importlib, socket\n"
        "opened = []\n"
        "real_open, real_io_open = builtins.open, io.open\n"
        "def spy(f, *a, **k):\n"
        "    opened.append(str(f)); return real_open(f, *a, **k)\n"
        "builtins.open = io.open = spy\n"
        "def no_network(*a, **k):\n"
        "    raise AssertionError('network at import: %r' % (a,))\n"
        "socket.socket.connect = no_network\n"
        "socket.create_connection = no_network\n"
        "import aver\n"
        "names = sorted(m.name for m in pkgutil.walk_packages(aver.__path__, 'aver.'))\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "import ray\n"
        "assert not ray.is_initialized(), 'ray was initialised at import'\n"
        "import sys\n"
        "system = ('/proc/', '/sys/', '/dev/', '/etc/', '/usr/', sys.prefix, sys.base_prefix)\n"
        "bad = [f for f in opened if not f.endswith(('.py', '.pyc')) and not f.startswith(system)\n"
        "       and '.egg-info/' not in f and '.dist-info/' not in f]  # package metadata\n"
        "assert not bad, bad\n"
        "assert not [f for f in opened if f.endswith(('.pt', '.parquet', '.mp4', '.npz'))], opened\n"
        "print(len(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip()) >= 27  # every module, not a chosen few


def test_the_cpu_stages_of_extract_distill_and_training_reads_load_no_torch():
    # Their Ray workers decode, crop and write: torch (~1.2 CPU-s and ~600 MB of RSS per process to
    # import, the CUDA build) belongs in the model actors and the training workers only.
    code = ("import sys\n"
            "import aver.pipelines.extract, aver.pipelines.distill, aver.data.faces, aver.pipelines.fetch\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


def test_building_the_models_and_the_detector_imports_no_dynamo_and_roi_align_still_works():
    # torchvision imports torch._dynamo for one check inside roi_align (+1.5 CPU-s in every actor and
    # training worker that builds a model): aver's models import torchvision without it.
    code = ("import sys, torch\n"
            "from aver.models import IdentityNet, Student, Teacher\n"
            "from aver.faces import FaceDetector\n"
            "Student(), Teacher(), IdentityNet(), FaceDetector(device='cpu')\n"
            "print('torch._dynamo' in sys.modules)\n"
            "from torchvision.ops import roi_align\n"
            "x = torch.arange(64.).reshape(1, 1, 8, 8)\n"
            "out = roi_align(x, torch.tensor([[0., 0., 0., 4., 4.]]), 2, aligned=True)\n"
            "assert torch.allclose(out, x[:, :, :4, :4].reshape(1, 1, 2, 2, 2, 2).mean((3, 5))), out\n"
            "from torchvision.ops.roi_align import is_compile_supported\n"
            "print(is_compile_supported('cpu'), 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "True", "True"]
