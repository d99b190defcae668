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
