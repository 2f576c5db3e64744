#!/usr/bin/env bash
# One script for a CUDA machine: every GPU figure of this project in one JSON, within about 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; runs in the repository root
#
# Writes $OUT/gpu_check.json when $OUT is set, else ./gpu_check.json (in the directory it was started from),
# rewritten after every step, so a run cut short still leaves the figures of the steps it finished. Each step
# records its exit code, wall time, time limit, whether it timed out, the tail of its output and its figures.
#
# Steps, in priority order, each under `timeout` and all under one deadline (GPU_CHECK_SECONDS, default 470 s;
# a step that would start with under 15 s left is recorded as skipped):
#   env          torch / CUDA / GPU description, nvidia-smi
#   install      only when no usable Python environment is found: a venv with
#                `pip install -c constraints.txt -e '.[test]'` (the README's command; needs the network or a
#                wheel cache)
#   tests        pytest -m gpu (tests/test_gpu.py: chunked == unchunked steps on the GPU in fp32 and bf16, the
#                default GPU budget, a training run per precision); without a registered `gpu` marker, the test
#                files that need CUDA; without those, tests/test_memory.py (on the CPU), and it says so
#   scale        benchmarks/scale.py --suite gpu (RN50, ViT-B-16, ViT-L-14 x C 10/100/397/1000 x R 1/8 x fp32/bf16)
#   learners     benchmarks/learners.py --suite gpu (each prompt learner's step against CoOp's, ViT-B-16)
#   sweep_speed  benchmarks/sweep_speed.py --suite gpu, cut to 20 runs x 10 epochs to fit
#   speed        benchmarks/speed.py --suite gpu --model ViT-B-16 (needs ../shared/data/cifar10_jpeg.tar.gz, or
#                DSPT_CIFAR_TARBALL; skipped without it)
#
# Python: $PYTHON, else .venv/bin/python, else python3, whichever imports torch and open_clip; the checkout's
# src/ goes first on PYTHONPATH, so an environment installed elsewhere runs this checkout's dspt.
set -u

START=$(date +%s)
TOTAL=${GPU_CHECK_SECONDS:-470}
CALLER_DIR=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
DEST=$(cd "$CALLER_DIR" && mkdir -p "${OUT:-.}" && cd "${OUT:-.}" && pwd) || exit 1
JSON=$DEST/gpu_check.json
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dspt-gpu-check.XXXXXX")
STEPS=$WORK/steps.jsonl
: > "$STEPS"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

usable() { "$1" -c "import torch, open_clip" > /dev/null 2>&1; }
PY=""
for cand in ${PYTHON:-} "$ROOT/.venv/bin/python" python3; do
    if [ -n "$cand" ] && command -v "$cand" > /dev/null 2>&1 && usable "$cand"; then PY=$cand; break; fi
done
# the interpreter that writes the JSON: any python3 will do (standard library only)
JPY=${PY:-$(command -v python3 || command -v python || true)}
if [ -z "$JPY" ]; then echo "gpu_check: no python found" >&2; exit 1; fi

# assemble $JSON from the step records and each step's figures file (JSON, else text)
assemble() {
    "$JPY" - "$STEPS" "$JSON" "$START" "$TOTAL" "$ROOT" <<'PYEOF'
import json, os, sys, time
steps_file, out, start, total, root = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
steps = []
for line in open(steps_file, encoding="utf-8"):
    if not line.strip():
        continue
    rec = json.loads(line)
    fig = rec.pop("figures_file", None)
    if fig and os.path.isfile(fig):
        text = open(fig, encoding="utf-8", errors="replace").read()
        try:
            rec["figures"] = json.loads(text)
        except ValueError:
            rec["figures"] = text[-20000:]
    steps.append(rec)
doc = {"script": "benchmarks/gpu_check.sh", "repo": root, "work_dir": os.path.dirname(steps_file), "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start)),
       "elapsed_s": round(time.time() - start, 1), "deadline_s": total, "steps": steps,
       "summary": {s["name"]: {"rc": s["rc"], "wall_s": s["wall_s"], "status": s["status"]} for s in steps}}
tmp = out + ".tmp"
with open(tmp, "w", encoding="utf-8") as fh:
    json.dump(doc, fh, indent=2)
os.replace(tmp, out)
PYEOF
}

# record NAME STATUS RC WALL LIMIT FIGURES_FILE COMMAND NOTE
record() {
    "$JPY" - "$STEPS" "$WORK" "$@" <<'PYEOF'
import json, os, sys
steps, work, name, status, rc, wall, limit, figures, command, note = sys.argv[1:11]
def tail(path, n=4000):
    try:
        return open(path, encoding="utf-8", errors="replace").read()[-n:]
    except OSError:
        return ""
rec = {"name": name, "status": status, "rc": None if rc == "" else int(rc), "wall_s": None if wall == "" else float(wall),
       "limit_s": None if limit == "" else int(limit), "timed_out": rc in ("124", "137"), "command": command,
       "note": note or None, "stdout_tail": tail(os.path.join(work, name + ".out")),
       "stderr_tail": tail(os.path.join(work, name + ".err")), "figures_file": figures or None}
with open(steps, "a", encoding="utf-8") as fh:
    fh.write(json.dumps(rec) + "\n")
PYEOF
    assemble
}

# step NAME MAX_SECONDS FIGURES_FILE NOTE -- command...: runs it under the smaller of its limit and the time left
step() {
    local name=$1 max=$2 figures=$3 note=$4
    shift 5
    local left=$(( START + TOTAL - $(date +%s) - 5 ))
    local limit=$(( max < left ? max : left ))
    if (( limit < 15 )); then
        record "$name" skipped "" "" "" "" "$*" "out of time: ${left}s left of the ${TOTAL}s deadline"
        echo "gpu_check: $name skipped (out of time)" >&2
        return
    fi
    echo "gpu_check: $name (limit ${limit}s) ..." >&2
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"
    rc=$?
    t1=$(date +%s.%N)
    local status=ok
    if (( rc == 124 || rc == 137 )); then status=timed_out; elif (( rc != 0 )); then status=failed; fi
    record "$name" "$status" "$rc" "$("$JPY" -c "print(round($t1 - $t0, 1))")" "$limit" "$figures" "$*" "$note"
    echo "gpu_check: $name: $status (exit $rc)" >&2
}

skip() {  # skip NAME REASON
    : > "$WORK/$1.out"; : > "$WORK/$1.err"
    record "$1" skipped "" "" "" "" "" "$2"
    echo "gpu_check: $1 skipped: $2" >&2
}

# ---------------------------------------------------------------------------------------------- install
if [ -z "$PY" ]; then
    if command -v python3.11 > /dev/null 2>&1; then
        step install 240 "" "no Python with torch and open_clip found: installing the README's environment" -- \
            bash -c "python3.11 -m venv '$ROOT/.venv' && '$ROOT/.venv/bin/pip' install -q -c constraints.txt -e '.[test]'"
        if usable "$ROOT/.venv/bin/python"; then PY=$ROOT/.venv/bin/python; JPY=$PY; fi
    else
        skip install "no Python with torch and open_clip, and no python3.11 to build the venv with"
    fi
    if [ -z "$PY" ]; then
        echo "gpu_check: no usable Python environment; figures so far in $JSON" >&2
        exit 1
    fi
fi

# ------------------------------------------------------------------------------------------------ env
step env 30 "$WORK/env.json" "" -- "$PY" -c "
import json, platform, subprocess, torch, open_clip
d = {'python': platform.python_version(), 'torch': torch.__version__, 'open_clip': open_clip.__version__,
     'cuda_available': torch.cuda.is_available(), 'torch_cuda': torch.version.cuda, 'python_path': '$PY',
     'cpus': __import__('os').cpu_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), capability=f'{p.major}.{p.minor}',
             gpus=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported(),
             allow_tf32=torch.backends.cuda.matmul.allow_tf32)
try:
    d['nvidia_smi'] = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,memory.used,driver_version,'
                                      'clocks.max.sm', '--format=csv'], capture_output=True, text=True,
                                     timeout=20).stdout
except Exception as e:
    d['nvidia_smi'] = repr(e)
json.dump(d, open('$WORK/env.json', 'w'), indent=2)
print(json.dumps(d))
"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" > /dev/null 2>&1; then
    skip gpu "no CUDA GPU visible to torch: the GPU steps cannot run"
    echo "gpu_check: no CUDA GPU; figures in $JSON" >&2
    exit 1
fi

# --------------------------------------------------------------------------------------------- tests
if grep -q -E '"gpu[:"]' pyproject.toml tests/conftest.py 2>/dev/null; then
    TESTS=(-m gpu)
    TEST_NOTE="tests marked gpu"
else
    mapfile -t GPU_FILES < <(grep -l -E "pytest\.mark\.gpu|requires_cuda|skipif\(not torch\.cuda\.is_available" tests/*.py 2>/dev/null)
    if (( ${#GPU_FILES[@]} )); then
        TESTS=("${GPU_FILES[@]}")
        TEST_NOTE="test files that need CUDA: ${GPU_FILES[*]}"
    else
        TESTS=(tests/test_memory.py)
        TEST_NOTE="tests/ has no GPU tests (no gpu marker, no test needing CUDA): ran tests/test_memory.py on this machine's CPU instead"
    fi
fi
step tests 75 "$WORK/tests.json" "$TEST_NOTE" -- bash -c "
'$PY' -m pytest -q -p no:cacheprovider --junitxml='$WORK/tests.xml' ${TESTS[*]}; rc=\$?
'$PY' - <<'EOF'
import json, xml.etree.ElementTree as ET
try:
    suite = ET.parse('$WORK/tests.xml').getroot()
    suite = suite if suite.tag == 'testsuite' else suite[0]
    d = {k: int(suite.get(k, 0)) for k in ('tests', 'failures', 'errors', 'skipped')}
    d['time_s'] = float(suite.get('time', 0))
    d['failed'] = [f\"{c.get('classname')}::{c.get('name')}\" for c in suite.iter('testcase')
                   if c.find('failure') is not None or c.find('error') is not None]
except Exception as e:
    d = {'error': repr(e)}
json.dump(d, open('$WORK/tests.json', 'w'), indent=2)
EOF
exit \$rc"

# ------------------------------------------------------------------------------------------ benchmarks
step scale 170 "$WORK/scale.json" "scale.py --suite gpu, 2 timed steps per case after 1 warm-up" -- \
    "$PY" benchmarks/scale.py --suite gpu --steps 2 --json "$WORK/scale.json"

step learners 60 "$WORK/learners.json" "learners.py --suite gpu: every prompt learner's step against CoOp's at ViT-B-16, C 10/100, batch 4/32, fp32/bf16" -- \
    "$PY" benchmarks/learners.py --suite gpu --batch 4,32 --json "$WORK/learners.json"

step sweep_speed 80 "$WORK/sweep_speed.out" "sweep_speed.py --suite gpu cut to 20 runs x 10 epochs (its default 100 x 200 does not fit 8 minutes); figures: its printed table (it has no --json)" -- \
    "$PY" benchmarks/sweep_speed.py --suite gpu --runs 20 --epochs 10 --work "$WORK/sweep"

TARBALL=${DSPT_CIFAR_TARBALL:-}
for cand in "$ROOT/../shared/data/cifar10_jpeg.tar.gz" "$ROOT/shared/data/cifar10_jpeg.tar.gz"; do
    if [ -z "$TARBALL" ] && [ -f "$cand" ]; then TARBALL=$cand; fi
done
if [ -n "$TARBALL" ] && [ -f "$TARBALL" ]; then
    step speed 100 "$WORK/speed.json" "speed.py --suite gpu with ViT-B-16 only, 2 epochs (RN50 as well does not fit 8 minutes)" -- \
        "$PY" benchmarks/speed.py --suite gpu --model ViT-B-16 --epochs 2 --text-reps 3 --data-tarball "$TARBALL" \
        --work "$WORK/speed" --json "$WORK/speed.json"
else
    skip speed "no CIFAR-10 archive (../shared/data/cifar10_jpeg.tar.gz, ./shared/data/..., or DSPT_CIFAR_TARBALL)"
fi

assemble
echo "gpu_check: done in $(( $(date +%s) - START ))s; figures in $JSON" >&2
