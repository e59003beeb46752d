#!/usr/bin/env bash
# The GPU checks and benchmarks in a few device runs (each part fits one 10-minute run).
#
#   bash bench/gpu_suite.sh tests-kernels   # GPU-marked tests of the decode kernels + FastBackend (one run)
#   bash bench/gpu_suite.sh tests-rest      # engine and model GPU tests (another run); `tests` = both
#   bash bench/gpu_suite.sh rollout    # prefill per length + batched, agent_decode, engine GPU tests (one run)
#   bash bench/gpu_suite.sh decode     # bench/decode.py, bitmamba2-1b and mini-agent-hybrid -> $OUT/decode*.json
#   bash bench/gpu_suite.sh ray        # needs Ray: GPU OOM backoff, agent_decode, learner memory (bench/grpo.py)
#   bash bench/gpu_suite.sh grpo       # needs Ray: GRPO step-time breakdown (bench/grpo.py --only step)
#   bash bench/gpu_suite.sh profile    # sampling cost per step; kernel-level profiles of decode and a 2K training step
#   bash bench/gpu_suite.sh scaling    # Ray, 4 GPUs (nvidia-h200-x4): rollout throughput over 1/2/4 workers
#   bash bench/gpu_suite.sh trl        # TRL GRPOTrainer baseline (pack trl first: see bench/grpo_trl.py)
#   bash bench/gpu_suite.sh save-cache # Triton's compile cache -> $OUT/triton_cache.tgz (see below)
#
# Every item has its own time limit, so one slow item cannot eat the run; results land in $OUT
# (default bench/results) as they are produced. On the device: start the command with
# `source .device/bin/setup.sh || exit 1;` (the device's environment, outside this repository).
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# Triton's compile cache from an earlier machine (same image, sm_90, same sources => same keys): most of a
# fresh machine's first minutes go to compiling. Save it with `bash bench/gpu_suite.sh save-cache`, copy the
# returned file to .device/triton_cache.tgz here, and carry that path in the next runs.
if [[ -f .device/triton_cache.tgz && ! -f ~/.triton/.restored ]]; then
  mkdir -p ~/.triton && tar xzf .device/triton_cache.tgz -C ~/.triton && touch ~/.triton/.restored \
    && echo "restored Triton cache: $(du -sh ~/.triton/cache | cut -f1)"
fi

item() {   # item SECONDS LOGNAME command...
  local t=$1 name=$2
  shift 2
  echo "== $name (limit ${t}s): $*"
  local t0=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc after $((SECONDS - t0))s"
  grep -v "Warning\|warn(" "$OUT/$name.log" | tail -"${TAIL:-25}" | cut -c1-220
}

case "${1:-}" in
  tests|tests-kernels|tests-rest)   # tests = both halves (over 10 minutes on a fresh machine: run them apart)
    # BITMAMBA_AUTOTUNE=0: two configs per ternary kernel; MAMBA_DETERMINISTIC=1 without
    # TRITON_CACHE_AUTOTUNING: mamba-ssm runs its cheapest config instead of autotuning (~50 s per shape);
    # --timeout (pytest-timeout, in the device image): a test stuck compiling fails instead of eating the run
    export MAMBA_DETERMINISTIC=1 BITMAMBA_AUTOTUNE=0
    unset TRITON_CACHE_AUTOTUNING
    if [[ $1 != tests-rest ]]; then
      item 400 gpu_tests_kernels python -m pytest -v -p no:cacheprovider -o addopts="" -m gpu \
        tests/test_gpu_decode.py --durations=12 --timeout=120
    fi
    if [[ $1 != tests-kernels ]]; then
      item 200 gpu_tests_engine python -m pytest -v -p no:cacheprovider -o addopts="" -m gpu \
        tests/test_engine_gpu.py --durations=8 --timeout=90
      item 200 gpu_tests_model python -m pytest -v -p no:cacheprovider -o addopts="" -m gpu \
        tests/test_gpu_model.py --durations=8 --timeout=90
    fi
    ;;
  rollout)   # engine changes: batched prefill (prefill_many) and stacked state, timed and tested in one run
    if [[ -z ${NO_PREFILL:-} ]]; then
      TRITON_PRINT_AUTOTUNING=1 item 120 prefill python bench/prefill.py --preset mini-agent-scout \
        --lengths 17 18 19 24 33 47 64 --prompts 64 --out "$OUT/prefill.json"
    fi
    item 200 agent_decode python bench/agent_decode.py --out "$OUT/agent_decode.json"
    MAMBA_DETERMINISTIC=1 BITMAMBA_AUTOTUNE=0 item 180 gpu_tests_engine python -m pytest -v -p no:cacheprovider \
      -o addopts="" -m gpu tests/test_engine_gpu.py --durations=8 --timeout=90
    ;;
  decode)
    item 300 decode_1b python bench/decode.py --preset bitmamba2-1b --batch 1 16 64 256 --hf-batch 1 64 \
      --out "$OUT/decode.json"
    item 280 decode_hybrid python bench/decode.py --preset mini-agent-hybrid --batch 1 16 64 256 --hf-batch 1 \
      --out "$OUT/decode_hybrid.json"
    ;;
  ray)
    item 120 gpu_oom python tests/reliability/gpu_oom.py --slots 1048576 --memory-gib 2
    item 200 agent_decode python bench/agent_decode.py --out "$OUT/agent_decode.json"
    MAMBA_DETERMINISTIC=1 item 240 grpo_memory python bench/grpo.py --only memory --out "$OUT/grpo_memory.json"
    ;;
  grpo)
    # full autotuning (ours and mamba-ssm's) in the warm-up step; timed: steps 2-3
    # the 4th step's update runs under torch.profiler (op tables -> $OUT/learn_profile.txt; not timed)
    BITMAMBA_PROFILE_LEARN="$OUT" BITMAMBA_PROFILE_STEP=3 item 560 grpo_step python bench/grpo.py --only step \
      --steps 4 --out "$OUT/grpo.json"
    ;;
  scaling)
    item 540 rollout_scaling python bench/rollout_scaling.py --workers 1 2 4 --out "$OUT/rollout_scaling.json"
    ;;
  trl)
    # TRL and datasets travel as wheels in .whl (see bench/grpo_trl.py's docstring)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    item 540 grpo_trl python bench/grpo_trl.py --steps 2 --out "$OUT/grpo_trl.json" --compare bench/results/grpo.json
    ;;
  profile)
    item 90 sampling python bench/sampling.py --out "$OUT/sampling.json"
    item 400 profile python bench/gpu_profile.py --decode-batch 1 64 --train-context 2048 --out "$OUT/profile.json"
    ;;
  save-cache)   # the machine's Triton cache -> $OUT/triton_cache.tgz (at most 16 MiB comes back)
    tar czf "$OUT/triton_cache.tgz" -C ~/.triton cache && ls -la "$OUT/triton_cache.tgz"
    ;;
  *)
    sed -n 2,17p "$0"
    exit 2
    ;;
esac
