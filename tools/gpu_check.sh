#!/usr/bin/env bash
# Check the GPU code paths of a CUDA machine in a few minutes, on the built-in mini corpus:
#   1. the sv-eres2net recipe, stages 1-5 (eres2net_mini), trained under torchrun on one GPU
#      and extracted on it; its results table;
#   2. the full ERes2Net base configuration of the real recipe (experiment=eres2net: batch 256,
#      3 s crops, speed perturbation and augmentation) for a few iterations in each precision
#      (fp32, bf16, fp16 with loss scaling): samples/s and the time spent waiting for data.
# Each part's log goes to --out; the summary is printed and appended to <out>/gpu_check.md as each
# part ends. A part that runs over --part_timeout seconds is stopped and reported (exit 124), and
# the check goes on with the next.
#
# Usage: bash tools/gpu_check.sh [--out DIR] [--gpu N] [--steps N] [--workers N] [--part_timeout S]
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

out=exp/gpu_check
gpu=0           # the GPU to use
steps=20        # iterations of each precision run (the mini index has 22 batches of 256)
workers=8       # data workers per run
part_timeout=600
help_message="usage: $0 [--out DIR] [--gpu N] [--steps N] [--workers N] [--part_timeout S]"
. "$root/tools/parse_options.sh"

if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$root/.venv/bin/python" ]; then
  export PATH="$root/.venv/bin:$PATH"
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary="$out/gpu_check.md"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; \
print(f'torch {torch.__version__}, {torch.cuda.get_device_name($gpu)}')" > "$summary" || exit 1
failed=0
note() { echo "$*" | tee -a "$summary"; }

# 1. The recipe on one GPU.
start=$SECONDS
(cd "$root/egs/3dspeaker/sv-eres2net" &&
  timeout -k 10 "$part_timeout" bash run.sh --corpus mini --experiment eres2net_mini \
    --gpus "$gpu" --data "$out/data" --raw_data "$out/mini_raw" --exp "$out/eres2net_mini" \
    -- "data.num_workers=$workers" "trainer.progress_bar=false") > "$out/recipe.log" 2>&1
status=$?
note ""
note "## sv-eres2net recipe (mini, eres2net_mini) on GPU $gpu: exit $status, $((SECONDS - start)) s"
if [ $status -eq 0 ]; then
  grep -E "stage [0-9]" "$out/recipe.log" | tee -a "$summary"
else
  failed=1; tail -5 "$out/recipe.log" | tee -a "$summary"
fi
results="$out/eres2net_mini/scores/results.md"
[ -f "$results" ] && tee -a "$summary" < "$results"

# 2. ERes2Net base, the real recipe's configuration, in each precision.
prepared="$out/data"
for precision in fp32 bf16 fp16; do
  exp="$out/eres2net_base_$precision"
  start=$SECONDS
  CUDA_VISIBLE_DEVICES="$gpu" timeout -k 10 "$part_timeout" speakerlab train experiment=eres2net \
    "data.train_dir=$prepared/3dspeaker/train" "data.noise_list=$prepared/musan/wav.scp" \
    "data.rir_list=$prepared/rirs/wav.scp" \
    data.segment_seconds=1.0 "data.num_workers=$workers" "exp_dir=$exp" trainer.device=cuda \
    "trainer.precision=$precision" trainer.epochs=1 "trainer.max_steps_per_epoch=$steps" \
    trainer.log_every_steps=5 trainer.progress_bar=false > "$out/base_$precision.log" 2>&1
  status=$?
  note ""
  note "## ERes2Net base, batch 256, $precision, $steps iterations: exit $status," \
    "$((SECONDS - start)) s"
  [ $status -eq 0 ] || { failed=1; tail -5 "$out/base_$precision.log" | tee -a "$summary"; }
  [ -f "$exp/train.log" ] && grep -E "iteration [0-9]+/[0-9]+:" "$exp/train.log" | \
    sed 's/^.*INFO //' | tee -a "$summary"
done
exit $failed
