import subprocess
import sys


def test_import_starts_nothing_and_reads_no_weights():
    # A fresh interpreter: importing every aver module must not start Ray or touch the network/files.
    code = (
        "import sys, builtins\n"
        "opened = []\n"
        "real_open = builtins.open\n"
        "def spy(f, *a, **k):\n"
        "    opened.append(str(f)); return real_open(f, *a, **k)\n"
        "builtins.open = spy\n"
        "import aver, aver.models, aver.audio, aver.losses, aver.metrics, aver.weights, aver.storage\n"
        "import ray\n"
        "assert not ray.is_initialized(), 'ray was initialised at import'\n"
        "bad = [f for f in opened if f.endswith(('.pt', '.pth', '.parquet', '.mp4'))]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
