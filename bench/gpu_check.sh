#!/usr/bin/env bash
# One GPU check for one H100/H200, about 8 minutes, one JSON:
#
#     bench/gpu_check.sh [OUT.json]        (default runs/gpu_check.json; PY=.venv/bin/python)
#
# 1. the tests marked `gpu` (tests/gpu: bf16 CUDA step, SDPA on flash/cuDNN, one-rank NCCL, pinned
#    loader, CUDA RNG through a checkpoint, ZeRO-2/3 on the GPU), as pass/fail per test;
# 2. training MFU of 307m and 1.4b, bf16 autocast, SDPA's flash path, compile off and on
#    (bench/train_step.py --compiled), against the dense bf16 datasheet peak;
# 3. 307m sampling images/s (token sampling; L = 256 on the 32x32 grid) at batch 1/16/64, eager
#    (bf16 autocast) and compiled (bf16 weights, CUDA graphs), compile time apart.
# Each part has its own time limit; a part that fails or runs out is recorded as such and the
# JSON is still written. Without a GPU it writes a JSON that says so, with the tests it would
# run (`pytest --collect-only -m gpu`), and exits 0: the CPU fallback the test suite checks.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check.json}
PY=${PY:-.venv/bin/python}
LIMIT_TESTS=${LIMIT_TESTS:-170}
LIMIT_MFU=${LIMIT_MFU:-110}        # per model
LIMIT_SAMPLING=${LIMIT_SAMPLING:-80}  # per batch size
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
mkdir -p "$(dirname "$OUT")"

# part <name> <limit> <stdout file> <command...>: runs it under its limit, records rc and seconds
part() {
  local name=$1 limit=$2 out=$3
  shift 3
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$out" 2>"$WORK/$name.err"
  echo "$name $? $(( $(date +%s) - t0 ))" >>"$WORK/parts.txt"
}

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  GPU=1
  part tests "$LIMIT_TESTS" "$WORK/tests.log" "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider \
    --junitxml="$WORK/tests.xml"
  part mfu_307m "$LIMIT_MFU" "$WORK/mfu_307m.json" "$PY" bench/train_step.py --compiled \
    --config configs/stackformer/307m.yaml --batch 32 --steps 10 --precisions bf16
  part mfu_1.4b "$LIMIT_MFU" "$WORK/mfu_1.4b.json" "$PY" bench/train_step.py --compiled \
    --config configs/stackformer/1.4b.yaml --batch 16 --steps 8 --precisions bf16
  for b in 1 16 64; do
    part "sampling_b$b" "$LIMIT_SAMPLING" "$WORK/sampling_b$b.json" "$PY" bench/sampling.py --compiled \
      --config configs/stackformer/307m.yaml --cases "256x32:$b" --samplings top_k --dtypes bf16 --repeats 3
  done
else
  GPU=0
  part tests 120 "$WORK/tests.log" "$PY" -m pytest --collect-only -q -m gpu tests/gpu -p no:cacheprovider
fi

GPU=$GPU WORK=$WORK OUT=$OUT START=$START "$PY" - <<'EOF'
"""Gather the parts into one JSON (atomic write)."""
import datetime
import json
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

work, gpu = Path(os.environ["WORK"]), os.environ["GPU"] == "1"


def read_json(name):
    try:
        return json.loads((work / name).read_text())
    except (OSError, ValueError):
        return None


def tail(name, n=1500):
    try:
        return (work / name).read_text()[-n:]
    except OSError:
        return ""


parts = {}
for line in (work / "parts.txt").read_text().split("\n"):
    if line.strip():
        name, rc, sec = line.split()
        parts[name] = {"rc": int(rc), "seconds": int(sec), "timed_out": rc in ("124", "137")}
report = {
    "bench": "gpu_check", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "gpu": torch.cuda.get_device_name() if gpu else None, "torch": torch.__version__,
    "cuda": torch.version.cuda, "parts": parts,
}
if not gpu:
    report["note"] = "no CUDA device: nothing measured; these are the tests a GPU run would run"
    report["gpu_tests_selected"] = [x for x in tail("tests.log", 10 ** 6).split("\n") if "::" in x]
else:
    tests = {}
    try:
        for case in ET.parse(work / "tests.xml").getroot().iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            skipped = case.find("skipped") is not None
            tests[case.get("name")] = ("failed: " + (bad.get("message") or "")[:300] if bad is not None
                                       else "skipped" if skipped else "passed")
    except (OSError, ET.ParseError):
        tests["(no report)"] = tail("tests.log") or tail("tests.err")
    report["tests"] = tests
    report["mfu"] = {}
    for m in ("307m", "1.4b"):
        got = read_json(f"mfu_{m}.json")
        report["mfu"][m] = ({k: v for k, v in got["results"][0].items() if k != "runs_ms"} if got
                            else {"error": tail(f"mfu_{m}.err")})
        if got:
            report["mfu"][m]["peak_bf16_tflops"] = got.get("peak_bf16_tflops")
    report["sampling_307m"] = {}
    for b in (1, 16, 64):
        got = read_json(f"sampling_b{b}.json")
        report["sampling_307m"][str(b)] = ({k: v for k, v in got["results"][0].items() if k != "runs"} if got
                                           else {"error": tail(f"sampling_b{b}.err")})
report["total_seconds"] = int(time.time()) - int(os.environ["START"])
out = Path(os.environ["OUT"])
tmp = out.with_name(out.name + ".partial")
tmp.write_text(json.dumps(report, indent=2) + "\n")
tmp.replace(out)
print(json.dumps(report, indent=2))
EOF
