#!/usr/bin/env bash
# Everything that needs a GPU, by stage; one device call runs at most 10 minutes, so run them apart:
#   run(command="bash benchmarks/gpu_session.sh kernels")   # GPU tests, kernel benchmarks, sweeps
#   run(command="bash benchmarks/gpu_session.sh steps")     # the model steps, by phase; plain DPO
# No argument runs every stage.
# GPU tests (compiled kernels at realistic shapes), the kernel benchmarks (issue shapes and a sweep
# with plots) and the LLaVA-1.5-7B- and Qwen2.5-VL-3B-architecture steps.
# Results go to $OUT, which the tool brings back;
# copy them into benchmarks/results/ and run `python -m benchmarks.report` to refresh the README.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/mdpo-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
STAGES=${*:-kernels steps}
if [[ " $STAGES " == *" kernels "* ]]; then
  python3 -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log"
  python3 -m benchmarks.kernels --device cuda --results "$OUT" 2>&1 | tee "$OUT/kernels.log"
  python3 -m benchmarks.kernels --device cuda --op linear mdpo --sweep --results "$OUT" 2>&1 | tee -a "$OUT/kernels.log"
fi
if [[ " $STAGES " == *" steps "* ]]; then
  # mDPO with the time per phase (torch.profiler, device time) against the published step and TRL's DPO step, and
  # packed rows attended unit by unit (the CPU default) against dense SDPA (the GPU default); then plain DPO
  # against TRL's DPO step; then Qwen2.5-VL. Each provider loads its model afresh: four, two and two runs.
  python3 -m benchmarks.step --model llava-1.5-7b --profile --providers published trl_dpo mdpo_fast unit_sdpa \
    --results "$OUT" 2>&1 | tee "$OUT/step.log"
  python3 -m benchmarks.step --model llava-1.5-7b --loss_weights 1 0 0 --providers published mdpo_fast \
    --results "$OUT" 2>&1 | tee -a "$OUT/step.log"
  python3 -m benchmarks.step --model qwen2.5-vl-3b --profile --providers published mdpo_fast --results "$OUT" 2>&1 \
    | tee -a "$OUT/step.log"
fi
