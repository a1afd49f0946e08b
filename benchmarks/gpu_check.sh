#!/usr/bin/env bash
# The GPU checks of one device session, in the order of what they are worth, within a time limit:
#   bash benchmarks/gpu_check.sh OUT_DIR [SECONDS]      (default 570)
# 1. the GPU test: a rollout thread on a CUDA stream of its own makes the default stream's run, bit
#    for bit (tests/test_train.py; about 30 s, most of it the warm start);
# 2. the async pipeline on a 1B Llama with the static cache, 20 steps a run: S = 0 and S = 1 with
#    the rollout worker in a thread, in a process, and in a thread on a CUDA stream of its own
#    (the S = 0 row's train_s is the learner step, fp32 masters included);
# 3. optim.skip_padding on the 1B recipe's learner passes (gradient checkpointing, micro-batches
#    of 16, responses up to 512 tokens; benchmarks/skip_padding.py);
# 4. generation, stalerl's engine against plain generate (dynamic and static cache), and 5. a
#    profile of one call of each (benchmarks/generate_profile.py), while time is left.
# On an H200 (2026-11-27, a fresh machine) the stages took: checkpoint 18 s, GPU test 41 s, async
# 264 s (four runs of 20 steps: the first 66 s with a cold compile cache, the others 36-46 s plus
# about 16 s of process start-up each), skip-padding 22 s, gen 111 s; the profile was cut at 108 s
# after two of its three calls. The machine's start and the copy took about 36 s more.
# Needs stalerl importable (PYTHONPATH=$PWD where it is not installed). SHAPE=tiny DEVICE=cpu runs every
# stage on a CPU in a few minutes, to check the script before it spends device time. The reports are
# flat files in OUT (what a device call brings back); the runs' own folders stay in WORK
# (default /tmp/stalerl-gpu-check).
# Each stage has its own time limit and writes its own report, so a stage cut short loses only itself
# (and the async stage keeps the runs it finished: bench.json's async part is then `unfinished`).
set -u -o pipefail
out=${1:?OUT_DIR}
budget=${2:-570}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/check.log"
shape=${SHAPE:-llama-3.2-1b}
device=${DEVICE:-cuda}
work=${WORK:-/tmp/stalerl-gpu-check}
mkdir -p "$work"
left() { local rest=$((budget - SECONDS)); (( rest < $1 )) && echo "$rest" || echo "$1"; }
stage() {  # stage NAME MAX_SECONDS COMMAND...
  local name=$1 limit; limit=$(left "$2"); shift 2
  if (( limit < 20 )); then echo "== $name: skipped, ${limit} s left" | tee -a "$log"; return; fi
  echo "== $name (limit ${limit} s, at ${SECONDS} s)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]} at ${SECONDS} s" | tee -a "$log"
  keep
}
keep() {  # the bench reports as they stand, after every stage: a call cut short still brings them back
  local part
  for part in async gen; do
    [[ -f $work/$part/bench.json ]] && cp "$work/$part/bench.json" "$out/bench-$part.json"
  done
  return 0
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$log"
checkpoint=$work/random-$shape
data=data/gsm8k_sample.jsonl
stage checkpoint 120 python3 -c "from pathlib import Path; from stalerl.random_checkpoint import save_random_checkpoint as s; \
s('$shape', Path('$checkpoint'), Path('$data'))"
model=(--model "$checkpoint" --data "$data")
stage gpu-test 120 python3 -m pytest -q -p no:cacheprovider \
  tests/test_train.py::test_a_rollout_thread_on_its_own_cuda_stream_makes_the_same_run
stage async 360 python3 -m stalerl.cli bench --out "$work/async" --parts async "${model[@]}" \
  --async-staleness 1 --async-steps 20 --set rollout.static_cache=true
stage skip-padding 90 python3 benchmarks/skip_padding.py --device "$device" --shape "$shape" --responses 512 \
  --micro-batches 16 --gradient-checkpointing --repeats 3 --json "$out/skip-padding-$shape.json"
stage gen 160 python3 -m stalerl.cli bench --out "$work/gen" --parts gen "${model[@]}"
stage profile 120 python3 benchmarks/generate_profile.py --model "$checkpoint" --data "$data"
ls -l "$out" | tee -a "$log"
