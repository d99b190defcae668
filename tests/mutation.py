"""Does the suite catch what it claims to? Bugs are planted in a copy of the repository, one at a
time, and the tests that guard the code are run against each: a bug they let through survives.

  python tests/mutation.py --planted            # the known bugs (issue 12's table and more)
  python tests/mutation.py --generic            # operator/constant mutants of the core modules
  python tests/mutation.py --generic --only aver/losses.py --max-per-module 10

``make mutate`` runs both. Survivors are listed at the end and in docs/testing.md with what was
done about each. The copy is a temporary folder; nothing here touches the working tree.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (file, text to replace, replacement, tests that must fail)
PLANTED = {
    "variants of one run built one after another from one seed": (
        "aver/train/harness.py", "        torch.manual_seed(cfg.seed)\n        models[name] =", "        models[name] =",
        ["tests/train/test_harness.py", "-k", "variants"]),
    "TensorBoard curves of the last epoch only": (
        "aver/train/harness.py", "    for row in history:\n        values =", "    for row in history[-1:]:\n        values =",
        ["tests/train/test_harness.py", "-k", "tensorboard"]),
    "every training worker prints its progress": (
        "aver/train/harness.py", "every_s=30.0 if rank0 else math.inf", "every_s=30.0",
        ["tests/train/test_harness.py", "-k", "progress"]),
    "frame_features max-pools frequency and reverses time": (
        "aver/models/vggish.py", "x = self.features(mel).mean(dim=3).transpose(1, 2)",
        "x = self.features(mel).amax(dim=3).flip(2).transpose(1, 2)", ["tests/models/test_vggish.py"]),
    "item ids from the salted hash()": (
        "aver/io/media.py", "hashlib.sha1(canonical.encode()).hexdigest()[:10]",
        'format(hash(canonical) & 0xFFFFFFFFFF, "010x")', ["tests/io/test_media.py", "-k", "ids"]),
    "chunk ids from the salted hash()": (
        "aver/pipelines/ledger.py", 'hashlib.sha1(chr(10).join(sorted(ids)).encode()).hexdigest()[:16]',
        'format(hash(chr(10).join(sorted(ids))) & 0xFFFFFFFFFFFFFFFF, "016x")',
        ["tests/io/test_media.py", "-k", "ids"]),
    "restore drops the checkpoint Ray offers": (
        "aver/train/harness.py", "ckpt = ray.train.get_checkpoint()", "ckpt = None",
        ["tests/train/test_harness.py", "tests/train/test_face_teacher.py", "-k", "restore or failure"]),
    "load_checkpoint leaves torch's initialisers off": (
        "aver/models/checkpoint.py", "            setattr(nn.init, n, f)", "            pass",
        ["tests/models/test_precision_and_checkpoints.py", "-k", "round_trip"]),
    "the student imports torchvision with torch._dynamo": (
        "aver/models/student.py", "        import_torchvision()\n        from torchvision.models", "        from torchvision.models",
        ["tests/test_import.py", "-k", "dynamo"]),
    "decoding frames loads torch again": (
        "aver/faces.py", "import numpy as np\nfrom PIL import Image\n", "import numpy as np\nimport torch\nfrom PIL import Image\n",
        ["tests/test_import.py", "-k", "cpu_stages"]),
    "evaluate swaps arousal and valence": (
        "aver/pipelines/evaluate.py", 'out[f"ccc.arousal.{variant}"] = ccc(target[:, 0], pred[:, 0])',
        'out[f"ccc.arousal.{variant}"] = ccc(target[:, 0], pred[:, 1])',
        ["tests/pipelines/test_evaluate.py", "-k", "known_answers"]),
    "evaluate scores the wrong FEC pair": (
        "aver/pipelines/evaluate.py", 'triplet_accuracy(e[f"{name}.i"], e[f"{name}.j"], e[f"{name}.k"])',
        'triplet_accuracy(e[f"{name}.i"], e[f"{name}.k"], e[f"{name}.j"])',
        ["tests/pipelines/test_evaluate.py", "-k", "known_answers"]),
    "CPU model actors sent two calls ahead": (
        "aver/pipelines/stages.py", "ahead = 1 if cfg.gpus_per_actor == 0 else None", "ahead = None",
        ["tests/pipelines/test_stages.py", "-k", "one_call_at_a_time"]),
    "GPU model actors sent one call at a time": (
        "aver/pipelines/stages.py", "ahead = 1 if cfg.gpus_per_actor == 0 else None", "ahead = 1",
        ["tests/pipelines/test_stages.py", "-k", "one_call_at_a_time"]),
    "a module-level ray.init() in aver/pipelines/stages.py": (
        "aver/pipelines/stages.py", 'from aver.pipelines.ledger import CLIPS, STAGING, Clip, Unit, plan_clips, status_row\n',
        'from aver.pipelines.ledger import CLIPS, STAGING, Clip, Unit, plan_clips, status_row\nimport ray\n'
        'ray.init(num_cpus=1, include_dashboard=False)\n',
        ["tests/test_import.py"]),
    "score_videos swaps its arousal and valence columns": (
        "aver/pipelines/score.py", 'rows[key]["arousal"], rows[key]["valence"] = float(a), float(v)',
        'rows[key]["arousal"], rows[key]["valence"] = float(v), float(a)', ["tests/pipelines/test_score.py", "-k", "direct"]),
    "the one-modality fallback feeds the face zeros the wrong way": (
        "aver/pipelines/score.py", "np.zeros((tv, VISUAL_DIM), np.float32)", "np.ones((tv, VISUAL_DIM), np.float32)",
        ["tests/pipelines/test_score.py", "-k", "direct"]),
    "AffectNet images looked for in the CSV's own folder (the old default)": (
        "aver/data/manifests.py", 'root = (images_root or affectnet_images_root(csv_uri, storage_options)).rstrip("/")',
        'root = (images_root or _parent(csv_uri)).rstrip("/")',
        ["tests/data/test_manifests.py", "tests/test_docs.py", "-k", "layout or as_written"]),
    "fusion windows cut from raw embeddings (not centred per recording)": (
        "aver/data/recola.py", "vis = centred(vis, np.abs(vis).sum(1) > 0)", "vis = vis",
        ["tests/data/test_features.py", "-k", "centred"]),
    "every prefix-store reader loads every part": (
        "aver/data/prefix_store.py", "        self._index(keys, where)\n",
        "        self._index(keys, where)\n        self.all = self._read(np.arange(len(self.keys)))\n",
        ["tests/train/test_harness.py", "-k", "rows_asked"]),
    "an empty prefix store taken for no store": (
        "aver/train/batches.py", "self.store.encode(v, self.encode) if self.store is not None",
        "self.store.encode(v, self.encode) if self.store",
        ["tests/train/test_vggish.py", "-k", "two_workers"]),
    "circumplex names written at their points": (
        "aver/pipelines/report.py", 'xytext=(1.04, 1 - (i + 0.5) / n), textcoords="axes fraction"',
        'xytext=(4, 4), textcoords="offset points"', ["tests/pipelines/test_report.py", "-k", "overlap"]),
    "the primary person is the smallest face": (
        "aver/tracking.py", "return max(sorted(weight), key=lambda p: weight[p]) if weight else None",
        "return min(sorted(weight), key=lambda p: weight[p]) if weight else None",
        ["tests/test_tracking.py", "-k", "tracker"]),
    "the tracker predicts no motion": (
        "aver/tracking.py", "self.x = self._F @ self.x", "self.x = self.x", ["tests/test_tracking.py", "-k", "motion"]),
    "a shot cut does not end the tracks": (
        "aver/tracking.py", "if cut or step - t.last > cfg.max_gap:", "if step - t.last > cfg.max_gap:",
        ["tests/test_tracking.py", "-k", "cut"]),
    "low-confidence detections start tracks": (
        "aver/tracking.py", "        for i in high:\n            if ids[i] is None:",
        "        for i in high + low:\n            if ids[i] is None:", ["tests/test_tracking.py", "-k", "spurious"]),
    "identity linking without the margin": (
        "aver/tracking.py", "best_sim - runner_up >= cfg.link_margin", "best_sim - runner_up >= 0",
        ["tests/test_tracking.py", "-k", "margin"]),
    "a person's rows at every step, on screen or not": (
        "aver/pipelines/score.py", "if not people.on_screen(pid, start, end):", "if not people.counts.get(pid):",
        ["tests/pipelines/test_score.py", "-k", "people_link"]),
    "distill's shared trunk feeds the teachers in the wrong order": (
        "aver/pipelines/distill.py", "out = [t(trunk, after=\"trunk\") for t in self.teachers]",
        "out = [t(trunk, after=\"trunk\") for t in self.teachers[::-1]]",
        ["tests/pipelines/test_distill.py", "-k", "shared_trunk"]),
    "crops in BGR": (
        "aver/faces.py", "            image = image.permute(2, 0, 1)\n", "            image = image.flip(2).permute(2, 0, 1)\n",
        ["tests/test_faces.py", "-k", "rgb"]),
    "the CPU stages' PIL crops in BGR": (
        "aver/faces.py", "return np.asarray(Image.fromarray(_as_rgb(image)).crop(region)",
        "return np.asarray(Image.fromarray(_as_rgb(image)[..., ::-1].copy()).crop(region)",
        ["tests/models/test_mtcnn.py", "-k", "crops"]),
    "device crops shrunk without antialiasing": (
        "aver/models/_base.py", 'return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True',
        'return F.interpolate(images, size=(size, size), mode="bilinear", antialias=False',
        ["tests/models/test_mtcnn.py", "-k", "crops"]),
    "MTCNN's refine crops end their area bins a pixel short": (
        "aver/models/mtcnn.py", "x0[:, None] + ((i + 1) * nx + size - 1) // size",
        "x0[:, None] + (i + 1) * nx // size", ["tests/models/test_mtcnn.py", "-k", "agrees"]),
    "O-Net's last NMS by IoU instead of the smaller box's area": (
        "aver/models/mtcnn.py", "overlap = wide * tall / torch.minimum(area[:, None], area[None, :])",
        "overlap = wide * tall / (area[:, None] + area[None, :] - wide * tall)",
        ["tests/models/test_mtcnn.py", "-k", "agrees"]),
    "MTCNN's NMS asks the host about every box": (
        "aver/models/mtcnn.py", "        keep &= ~(suppresses[k] & keep[k])",
        "        if keep[k]:\n            keep &= ~suppresses[k]", ["tests/models/test_mtcnn.py", "-k", "host"]),
    "DDP gradients never sent in bf16": (
        "aver/train/harness.py", "DistributedDataParallel) and cfg.bf16_gradients:", "DistributedDataParallel) and False:",
        ["tests/train/test_harness.py", "-k", "bf16"]),
    "training images read one at a time": (
        "aver/data/faces.py", "faces, reading.io_threads, reading.retry,", "faces, 1, reading.retry,",
        ["tests/data/test_faces.py", "-k", "in_flight"]),
    "unreadable training images dropped without a count": (
        "aver/data/faces.py", "\n    if failed and reading.dropped is not None:", "\n    if False:",
        ["tests/data/test_faces.py", "-k", "in_flight"]),
    "undecodable packed crops dropped without a count": (
        "aver/data/faces.py", "        if failed and reading.dropped is not None:", "        if False:",
        ["tests/data/test_faces.py", "-k", "packed"]),
    "an unreadable packed part dropped without a count": (
        "aver/data/faces.py", """            if reading.dropped is not None:
                reading.dropped.add.remote("unlabeled", [f"{redact(part)} (part)"])""",
        """            if False:
                pass""", ["tests/data/test_faces.py", "-k", "packed"]),
    "packed crops joined to the next target whatever its crop": (
        "aver/data/faces.py", "            if self._peek() == crop_id:", "            if self._peek() is not None:",
        ["tests/data/test_faces.py", "-k", "packed"]),
    "a part re-opened after a storage fault starts over": (
        "aver/io/parts.py", "_slices_from(uri, columns, rows, storage_options, done)",
        "_slices_from(uri, columns, rows, storage_options, 0)", ["tests/io/test_parts.py"]),
    "a frozen-prefix cache over its budget kept in the heap": (
        "aver/train/batches.py", "        if self.limit is not None and self.held > self.limit:", "        if False:",
        ["tests/train/test_batches.py", "-k", "mapped_file"]),
    "GPU model actors trim the heap after every call": (
        "aver/pipelines/stages.py", 'if getattr(self.device, "type", "cpu") == "cpu":', "if True:",
        ["tests/pipelines/test_stages.py", "-k", "trim"]),
    "fetch_fec's status of one manifest lists every manifest's images": (
        "aver/pipelines/fetch.py", "[rows[u] for u in its_urls]", "list(rows.values())",
        ["tests/pipelines/test_fetch.py"]),
    "a transient fault recorded as corrupt": (
        "aver/faults.py", '    if is_transient(exc):\n        return "failed"\n', "",
        ["tests/test_faults.py"]),
    "distill reads a faces part whole, then slices it": (
        "aver/io/parts.py", """        for batch in part.iter_batches(batch_size=rows, columns=columns, row_groups=groups):
            table = pa.Table.from_batches([batch])""",
        """        whole = part.read_row_groups(groups, columns=columns)
        for table in (whole.slice(s, rows) for s in range(0, len(whole), rows)):""",
        ["tests/pipelines/test_distill.py", "-k", "10000"]),
    "the committed record handed on to the driver": (
        "aver/pipelines/stages.py", '    return {"summary": summaries}\n',
        '    return {"summary": summaries, "record": [pickle.dumps(unpack(batch)[-1])] * len(summaries)}\n',
        ["tests/pipelines/test_stages.py", "-k", "driver"]),
    "streamed windows lose their first frames": (
        "aver/pipelines/score.py", "        while held and held[0][0] < w_start - 0.01:",
        "        while held and held[0][0] < w_start + 0.21:",
        ["tests/pipelines/test_score.py", "-k", "streamed"]),
    "chunks named by position": (
        "aver/pipelines/ledger.py", "units.append(Unit(chunk_id(prefix, ids),",
        "units.append(Unit(f\"{prefix}-{start // per_unit:06d}\",",
        ["tests/pipelines/test_fault_isolation.py", "-k", "adding"]),
    "training configs hand relative local paths to their workers": (
        "aver/train/harness.py", "            setattr(self, name, absolute(getattr(self, name)))",
        "            setattr(self, name, getattr(self, name))",
        ["tests/train/test_harness.py", "-k", "relative"]),
    "batch jobs hand relative local paths to their tasks": (
        "aver/pipelines/stages.py", "setattr(self, name, absolute(uri))",
        "setattr(self, name, uri)", ["tests/train/test_harness.py", "-k", "relative"]),
    "a stage copies each record's arrays out of its block": (
        "aver/pipelines/stages.py", "            yield memory[ends[k]:ends[k + 1]]\n",
        "            yield memoryview(bytes(memory[ends[k]:ends[k + 1]]))\n",
        ["tests/pipelines/test_stages.py", "-k", "out_of_band or staged_commits"]),
    "records packed into Ray Data's 128 MiB blocks (a model call slices, and copies, them)": (
        "aver/pipelines/stages.py", "        ds.context.target_max_block_size = 2**20\n",
        "        ds.context.target_max_block_size = 128 * 2**20\n",
        ["tests/pipelines/test_stages.py", "-k", "staged_commits"]),
    "decoding takes a thread per core whatever the task reserved": (
        "aver/io/media.py", "            vs.codec_context.thread_count = self.threads\n", "            pass\n",
        ["tests/io/test_media.py", "-k", "threads"]),
    "score_videos' load ignores the CPUs its task reserved": (
        "aver/pipelines/score.py", "threads=decode_threads(cfg.cpus_per_task))", "threads=0)",
        ["tests/io/test_media.py", "-k", "threads"]),
    # issue 28: long videos as clips
    "a clip samples from its own start, not the stream's slots": (
        "aver/io/media.py", "next_t, period, last_index, n = begin, 1.0 / fps, -1, 0",
        "next_t, period, last_index, n = begin + 0.1, 1.0 / fps, -1, 0",
        ["tests/io/test_media.py", "-k", "clip"]),
    "frame indices counted from the seek": (
        "aver/io/media.py", "index = max(round(t * rate) if rate else int(round(frame.pts)), last_index + 1)",
        "index = last_index + 1", ["tests/io/test_media.py", "-k", "clip or variable"]),
    "a clip seeks to its start, not the keyframe before it": (
        "aver/io/media.py", "backward=True, any_frame=False)", "backward=False, any_frame=True)",
        ["tests/io/test_media.py", "-k", "clip"]),
    "a clip's first frame never sees the frame before the clip (cuts at boundaries lost)": (
        "aver/faces.py", "                        if previous is None and reader.before is not None:",
        "                        if False:", ["tests/pipelines/test_clips.py", "-k", "whole"]),
    "a rerun reads committed clips again": (
        "aver/pipelines/ledger.py", "left = [c for c in clips if c.name not in done]", "left = clips",
        ["tests/pipelines/test_clips.py", "-k", "rerun"]),
    "clips of other settings kept for the rerun": (
        "aver/pipelines/ledger.py", '    key = "c" + hashlib.sha1(f"{clip_s!r}|{fps!r}".encode()).hexdigest()[:8]',
        '    key = "c" + hashlib.sha1(f"{fps!r}".encode()).hexdigest()[:8]',
        ["tests/pipelines/test_clips.py", "-k", "rerun"]),
    "video clips after the one whose stream broke are used": (
        "aver/pipelines/stages.py", "    used = [k <= ended or clip.ranges[k] is None for k in range(len(marks))]",
        "    used = [True for k in range(len(marks))]", ["tests/pipelines/test_clips.py", "-k", "broke"]),
    "the audio clip's ending replaces the video's": (
        "aver/pipelines/score.py", "    if r.unit.clip is not None and r.unit.clip.range is None:",
        "    if False:", ["tests/pipelines/test_clips.py", "-k", "whole"]),
    "fusion projects the student's embedding unscaled": (
        "aver/models/fusion.py", "c.stride, standardise=True)", "c.stride, standardise=False)",
        ["tests/models/test_fusion.py", "-k", "standardised"]),
    "demo sessions drawn on a background of the skin's own shade": (
        "aver/demo/corpus.py", "apart_from_skin(Identity.random(rng))", "Identity.random(rng)",
        ["tests/demo/test_corpus.py", "-k", "apart"]),
    "a local folder's walk enters linked folders": (
        "aver/io/storage.py", "    for root, folders, files in os.walk(path):",
        "    for root, folders, files in os.walk(path, followlinks=True):",
        ["tests/io/test_media.py", "-k", "local_folder"]),
    "a local folder's walk drops the links to folders that find lists": (
        "aver/io/storage.py", "        found += [os.path.join(root, d) for d in folders if os.path.islink(os.path.join(root, d))]\n",
        "", ["tests/io/test_media.py", "-k", "local_folder"]),
}

# module -> the tests that guard it (for the generic pass)
GUARDS = {
    "aver/losses.py": ["tests/test_losses.py"],
    "aver/metrics.py": ["tests/test_metrics.py"],
    "aver/audio.py": ["tests/test_audio.py"],
    "aver/models/fusion.py": ["tests/models/test_fusion.py"],
    "aver/models/vggish.py": ["tests/models/test_vggish.py"],
    "aver/faults.py": ["tests/test_faults.py"],
    "aver/io/storage.py": ["tests/io/test_storage.py"],
    "aver/data/features.py": ["tests/data/test_features.py", "tests/train/test_fusion.py", "-k", "take or timeline or window or student"],
    "aver/pipelines/ledger.py": ["tests/pipelines/test_stages.py", "tests/io/test_media.py", "tests/pipelines/test_fault_isolation.py", "-k",
                                 "staged or ids or adding"],
    "aver/pipelines/stages.py": ["tests/pipelines/test_stages.py"],
}

_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
          ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
          ast.NotEq: ast.Eq, ast.And: ast.Or, ast.Or: ast.And, ast.Pow: ast.Mult}


def _mutants(source: str):
    """(line, description, mutated source) for each operator swap and constant change in functions."""
    tree = ast.parse(source)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Module)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    in_function = set()
    for f in ast.walk(tree):
        if isinstance(f, ast.FunctionDef):
            in_function.update(id(n) for n in ast.walk(f))
    targets = []
    for node in ast.walk(tree):
        if id(node) not in in_function or id(node) in docstrings:
            continue
        if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in _SWAPS:
            targets.append((node, "op", None))
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in _SWAPS:
            targets.append((node, "cmp", None))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and not isinstance(node.value, bool):
            targets.append((node, "const", None))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            targets.append((node, "bool", None))
    for node, kind, _ in targets:
        old = None
        if kind == "op":
            old, node.op = node.op, _SWAPS[type(node.op)]()
            what = f"{type(old).__name__} -> {type(node.op).__name__}"
        elif kind == "cmp":
            old = node.ops[0]
            node.ops[0] = _SWAPS[type(old)]()
            what = f"{type(old).__name__} -> {type(node.ops[0]).__name__}"
        elif kind == "const":
            old = node.value
            node.value = old + 1 if isinstance(old, int) else old * 2 + 0.5
            what = f"{old!r} -> {node.value!r}"
        else:
            old, node.value = node.value, not node.value
            what = f"{old} -> {node.value}"
        mutated = ast.unparse(tree)
        if kind == "op":
            node.op = old
        elif kind == "cmp":
            node.ops[0] = old
        else:
            node.value = old
        yield node.lineno, what, mutated


def _run_tests(copy: str, tests: list[str], timeout: float) -> bool:
    """True when the tests fail (the mutant is killed)."""
    env = dict(os.environ, PYTHONPATH=copy, PYTHONDONTWRITEBYTECODE="1")
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return True  # a mutant that hangs the tests is caught by their timeouts
    return r.returncode != 0


def _copy() -> str:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    dest = tempfile.mkdtemp(prefix="aver-mutants-")
    for f in files:
        os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
    return dest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--planted", action="store_true", help="run the named planted bugs")
    p.add_argument("--generic", action="store_true", help="run operator/constant mutants of the core modules")
    p.add_argument("--only", nargs="*", default=None, help="modules (generic) or bug names (planted) to run")
    p.add_argument("--max-per-module", type=int, default=25, help="mutants per module, evenly spread (default 25)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per test run (default 600)")
    a = p.parse_args()
    if not (a.planted or a.generic):
        a.planted = a.generic = True
    copy = _copy()
    survivors, total = [], 0
    try:
        jobs = []
        if a.planted:
            for name, (path, old, new, tests) in PLANTED.items():
                if a.only and name not in a.only:
                    continue
                text = open(os.path.join(copy, path)).read()
                if old not in text:
                    raise SystemExit(f"planted bug {name!r}: {old!r} is no longer in {path}; update tests/mutation.py")
                jobs.append((f"planted: {name}", path, text.replace(old, new, 1), tests))
        if a.generic:
            for path, tests in GUARDS.items():
                if a.only and path not in a.only:
                    continue
                mutants = list(_mutants(open(os.path.join(copy, path)).read()))
                step = max(1, len(mutants) // a.max_per_module)
                for line, what, text in mutants[::step][:a.max_per_module]:
                    jobs.append((f"{path}:{line} {what}", path, text, tests))
        for tests in {tuple(t) for *_, t in jobs}:  # the unmutated copy must pass, or every mutant looks killed
            if _run_tests(copy, list(tests), a.timeout):
                raise SystemExit(f"the tests {' '.join(tests)} fail without any mutant: fix them first")
        for label, path, text, tests in jobs:
            original = open(os.path.join(copy, path)).read()
            with open(os.path.join(copy, path), "w") as f:
                f.write(text)
            t = time.time()
            killed = _run_tests(copy, tests, a.timeout)
            with open(os.path.join(copy, path), "w") as f:
                f.write(original)
            total += 1
            print(f"{'killed  ' if killed else 'SURVIVED'} {label} ({time.time() - t:.0f} s)", flush=True)
            if not killed:
                survivors.append(label)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    print(f"\n{total - len(survivors)} of {total} mutants killed; survivors:" + "".join(f"\n  {s}" for s in survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
