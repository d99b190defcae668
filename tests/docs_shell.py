"""The shell the documented commands run in (tests/test_docs.py): real bash, with stand-ins for the
commands that manage machines outside this one, and the flags that size each job to the test's data.

Stand-ins, each doing here what the real command does there:
- ``aws s3 sync SRC DST`` / ``aws s3 cp FILE... DST``: copy to the local S3 (moto) with fsspec;
- ``ray up CONFIG``: check the cluster config (head and GPU worker types, the pinned checkout); the
  test has started the cluster (a head declaring a GPU) before the block runs; ``ray dashboard`` and
  ``ray down``: nothing (the test's head serves its dashboard, and the test ends the cluster);
- ``make TARGET``: ``make -n`` in the checkout (the target exists and its recipe names real files;
  ``make test`` is this suite, ``make demo`` is 15 minutes);
- ``--use-gpu`` (Ray Train) is dropped: this machine has no CUDA, and Ray Train's NCCL group needs
  one. The batch jobs' and featurisers' GPU shares stay: the head declares a GPU and the actors fall
  back to the CPU on it.

Every other command runs as written; one the docs show and no stand-in covers is run for real and
fails the test when it fails.
"""

from __future__ import annotations

import os
import sys

# Flags appended to each job (argparse keeps the last value): one epoch, small batches, frozen
# face trunks computed once, short fusion windows and VGGish segments for 12-s sessions. VGGish
# trains whole, as the docs have it (its frozen-features path: tests/train/test_vggish.py).
TINY = {
    "train_teacher.py": "--epochs 1 --batch-size 8 --num-workers 1 --freeze trunk",
    "train_student.py": "--epochs 1 --batch-size 8 --num-workers 1 --freeze transition3",
    "train_vggish.py": "--epochs 1 --batch-size 8 --num-workers 1 --segment-frames 96 --hop-frames 20",
    "train_fusion.py": "--epochs 1 --batch-size 8 --num-workers 1 --window-s 4.8 --featurizers 1",
    "evaluate.py": "--window-s 4.8 --featurizer-cpus 1 --cpus-per-task 0.5",
    "distill.py": "--cpus-per-actor 1 --batch-size 64",
    "extract_faces.py": "--cpus-per-actor 1",
    "score_videos.py": "--cpus-per-actor 1 --batch-size 64",
}

PRELUDE = r"""
set -euo pipefail
tiny() {
  case "$(basename "$1")" in
%(cases)s
    *) ;;
  esac
}
without_gpu_training() { local a; for a in "$@"; do [[ $a == --use-gpu ]] || printf '%%s\0' "$a"; done; }
python() {
  local args; mapfile -d '' args < <(without_gpu_training "$@")
  echo "+ [${SECONDS}s] python ${args[*]} $(tiny "$1")" >&2
  # shellcheck disable=SC2046
  command python "${args[@]}" $(tiny "$1")
}
ray() {
  if [[ ${1:-} == job && ${2:-} == submit ]]; then
    shift 2
    local pre=(); while [[ $# -gt 0 && $1 != -- ]]; do pre+=("$1"); shift; done; shift
    local entry; mapfile -d '' entry < <(without_gpu_training "$@")
    echo "+ [${SECONDS}s] ray job submit ${pre[*]} -- ${entry[*]} $(tiny "${entry[1]}")" >&2
    local log; log=$(mktemp)
    # shellcheck disable=SC2046
    command ray job submit "${pre[@]}" -- "${entry[@]}" $(tiny "${entry[1]}") 2>&1 | tee "$log" >&2
    grep -q "Job '.*' succeeded" "$log"
  elif [[ ${1:-} == up ]]; then
    command python -m tests.docs_shell ray-up "${@:2}"
  elif [[ ${1:-} == dashboard || ${1:-} == down ]]; then
    echo "(stand-in) ray $*: the test's cluster" >&2
  else
    command ray "$@"
  fi
}
aws() { command python -m tests.docs_shell aws "$@"; }
make() { command make -n -C "$AVER_ROOT" "$@" > /dev/null; echo "(stand-in) make -n $*: ok" >&2; }
"""


def prelude() -> str:
    cases = "\n".join(f"    {script}) echo {flags} ;;" for script, flags in TINY.items())
    return PRELUDE % {"cases": cases}


def aws(args: list[str]) -> None:
    import fsspec

    if args[:2] == ["s3", "sync"] and len(args) == 4:
        sources, target = [args[2]], args[3]
    elif args[:2] == ["s3", "cp"] and len(args) >= 4:
        sources, target = args[2:-1], args[-1]
    else:
        sys.exit(f"aws stand-in: only 's3 sync SRC DST' and 's3 cp FILE... DST', not {args}")
    fs = fsspec.filesystem("s3")  # endpoint and keys from the environment, as the CLI takes them
    for src in sources:
        if os.path.isdir(src):
            for folder, _, files in os.walk(src, followlinks=True):
                for name in files:
                    path = os.path.join(folder, name)
                    fs.put_file(path, target.rstrip("/") + "/" + os.path.relpath(path, src))
        else:
            fs.put_file(src, target.rstrip("/") + "/" + os.path.basename(src))


def ray_up(args: list[str]) -> None:
    import yaml

    config = yaml.safe_load(open([a for a in args if not a.startswith("-")][0]))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU")]
    assert head and gpu, "cluster.yaml needs a head type and a GPU worker type"
    assert any("AVER_REV" in c for c in config.get("setup_commands", [])), "nodes install the pinned revision"
    print(f"(stand-in) ray up: {config['cluster_name']}: head {config['head_node_type']}, "
          f"{len(gpu)} GPU worker type(s); the test's cluster is up", file=sys.stderr)


if __name__ == "__main__":
    {"aws": aws, "ray-up": ray_up}[sys.argv[1]](sys.argv[2:])
