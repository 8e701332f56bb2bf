#!/usr/bin/env bash
# Check the GPU paths of a CUDA machine in at most 7 minutes, on the built-in mini corpus:
#   data       the mini corpus simulated and prepared (recipe stage 1)
#   recipe     the sv-eres2net recipe, stages 2-5 (eres2net_mini) under torchrun (NCCL, one
#              process on --gpu), and its results table
#   base_*     ERes2Net base with the real experiment's settings (batch 256, 3 s crops, speed
#              perturbation, augmentation p=0.8) in fp32, bf16 and fp16: samples/s, data wait,
#              GPU busy (nvidia-smi), peak memory, over the iterations after the warm-up
#   synthetic  the same model's optimizer step on synthetic batches (no loader): samples/s, model
#              FLOP/s over the bf16 matrix-product rate measured in the same run, host waits
#   extract    embeddings of 8 s utterances on the GPU: utterances/s, and their cosine to the CPU
#              PyTorch path (at least 0.9999 in fp32)
#   restart    a short fp32 run killed after a mid-epoch checkpoint and restarted: its final
#              weights must equal an uninterrupted run's
# Every part runs under `timeout` and appends its result lines to <out>/summary.md as it ends,
# so a check stopped early still reports every part that finished; each part's log is
# <out>/<part>.log. Parts that no longer fit in the 7 minutes are reported as skipped.
#
# --rehearse runs the same script on the CPU with every part shrunk (tiny models and batches,
# fp16 skipped), so that the GPU run is the second run of a script that already works; the test
# suite runs it (tests/test_gpu_check.py).
#
# Without a virtual environment the machine's python3 is used; wheels in <repo>/.whl (fetched
# beforehand on a machine with network access) are installed first when present.
#
# Usage: bash tools/gpu_check.sh --out DIR [--rehearse] [--gpu N] [--workers N] [--budget S]
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
self="$root/tools/gpu_check.sh"

out=""          # results folder (required): summary.md and one log per part
rehearse=false  # true: the CPU rehearsal
gpu=0           # the GPU to use
workers=12      # data workers per run (16 cores)
budget=420      # seconds for the whole check
part=""         # internal: run this one part
help_message="usage: $0 --out DIR [--rehearse] [--gpu N] [--workers N] [--budget S]"
# A bare --rehearse means --rehearse true.
args=()
while [ $# -gt 0 ]; do
  if [ "$1" = --rehearse ] && { [ $# -eq 1 ] || [[ "$2" == --* ]]; }; then
    args+=(--rehearse true)
  else
    args+=("$1")
  fi
  shift
done
set -- "${args[@]+"${args[@]}"}"
. "$root/tools/parse_options.sh"
[ -n "$out" ] || { echo "$help_message" >&2; exit 2; }
case "$rehearse" in true|false) ;; *) echo "--rehearse takes true or false" >&2; exit 2 ;; esac

export PYTHONUNBUFFERED=1
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$root/.venv/bin/python" ]; then
  export PATH="$root/.venv/bin:$PATH"
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary="$out/summary.md"
data="$out/data"
if [ "$rehearse" = true ]; then device=cpu; else device=cuda; fi

# ------------------------------------------------------------------------------------ parts
# Each part prints its result lines prefixed with "RESULT: " and exits non-zero on failure.

result() { echo "RESULT: $*"; }

# Training overrides of the prepared mini corpus on this check's device.
common_data=("data.train_dir=$data/3dspeaker/train" "data.noise_list=$data/musan/wav.scp"
             "data.rir_list=$data/rirs/wav.scp" "trainer.device=$device"
             trainer.progress_bar=false)

part_data() {
  local size=default; [ "$rehearse" = true ] && size=ci
  (cd "$root/egs/3dspeaker/sv-eres2net" && bash run.sh --corpus mini --mini_size "$size" \
    --stage 1 --stop_stage 1 --data "$data" --raw_data "$out/mini_raw" --exp "$out/recipe") ||
    return 1
  result "$(wc -l < "$data/3dspeaker/train/wav.scp") training and" \
    "$(wc -l < "$data/3dspeaker/test/wav.scp") test recordings in $data"
}

part_recipe() {
  local gpus=(--gpus "$gpu") extra=("data.num_workers=$workers")
  if [ "$rehearse" = true ]; then
    gpus=()
    extra=(model.m_channels=4 model.embedding_size=16 trainer.epochs=1 trainer.batch_size=16
           data.crop_seconds=1.0 data.num_workers=0)
  fi
  (cd "$root/egs/3dspeaker/sv-eres2net" && bash run.sh --corpus mini --experiment eres2net_mini \
    "${gpus[@]}" --stage 2 --stop_stage 5 --data "$data" --raw_data "$out/mini_raw" \
    --exp "$out/recipe" -- trainer.progress_bar=false "${extra[@]}") || return 1
  while IFS= read -r line; do result "$line"; done < "$out/recipe/scores/results.md"
}

base_run() {  # base_run PRECISION
  local precision=$1 exp="$out/base_$1" steps=44 warmup=10 batch=256 extra=()
  if [ "$rehearse" = true ]; then
    steps=4; warmup=2; batch=8
    extra=(model.m_channels=4 data.crop_seconds=1.0 data.num_workers=0 trainer.num_threads=2)
  fi
  local busy="$out/base_$precision.busy" sampler=""
  if command -v nvidia-smi > /dev/null && [ "$rehearse" = false ]; then
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -i "$gpu" -lms 250 \
      > "$busy" &
    sampler=$!
  fi
  # Two epochs of the mini index cut in 1 s rows: at least 40 iterations of 256.
  CUDA_VISIBLE_DEVICES="$gpu" speakerlab train experiment=eres2net "${common_data[@]}" \
    "exp_dir=$exp" "data.index=$out/base_index.tsv" data.segment_seconds=1.0 \
    "data.num_workers=$workers" "trainer.precision=$precision" "trainer.batch_size=$batch" \
    trainer.epochs=2 "trainer.max_steps_per_epoch=$((steps / 2))" trainer.log_every_steps=2 \
    trainer.save_every_epochs=0 trainer.save_every_minutes=0 "${extra[@]}"
  local status=$?
  [ -n "$sampler" ] && kill "$sampler" 2> /dev/null
  [ $status -eq 0 ] || return $status
  result "$(python3 "$root/tools/gpu_check.py" throughput --tensorboard "$exp/tensorboard" \
    --global-batch "$batch" --warmup "$warmup" --gpu-busy "$busy" \
    --label "ERes2Net base, batch $batch, $precision")"
}

part_synthetic() {
  local args=(--batch_size 256 --steps 30 --warmup 5) precisions=(fp32 bf16 fp16)
  if [ "$rehearse" = true ]; then
    args=(--batch_size 8 --steps 1 --warmup 1 --matmul_size 512 --override model.m_channels=4
          data.crop_seconds=1.0 trainer.num_threads=2)
    precisions=(fp32 bf16)
  fi
  local precision
  for precision in "${precisions[@]}"; do
    CUDA_VISIBLE_DEVICES="$gpu" python3 "$root/benchmarks/bench_training.py" --synthetic \
      --train_dir "$data/3dspeaker/train" --device "$device" --precision "$precision" \
      "${args[@]}" --label "synthetic $precision" > "$out/synthetic_$precision.txt" || return 1
    result "$(tail -1 "$out/synthetic_$precision.txt")"
  done
}

part_extract() {
  local count=512 subset=64 batch=(--batch-size 64 --max-batch-frames 64000)
  [ "$rehearse" = true ] && { count=2; subset=2; batch=(--batch-size 2); }
  python3 "$root/tools/gpu_check.py" long-utts --wav-scp "$data/3dspeaker/test/wav.scp" \
    --out "$out/long" --count "$count" --subset "$subset" || return 1
  python3 "$root/tools/gpu_check.py" base-model --out "$out/base_model.ckpt" || return 1
  rm -rf "$out/extract_device" "$out/extract_cpu"
  local start end
  start=$(date +%s.%N)
  local readers=$workers; [ "$rehearse" = true ] && readers=0
  CUDA_VISIBLE_DEVICES="$gpu" speakerlab extract --model "$out/base_model.ckpt" \
    --wav-scp "$out/long/wav.scp" --out-dir "$out/extract_device" --backend torch \
    --device "$device" "${batch[@]}" --num-workers "$readers" --no-progress || return 1
  end=$(date +%s.%N)
  result "extraction of $count utterances of 8 s on $device: $(python3 -c \
    "print(f'{$count / ($end - $start):.1f}')") utterances/s (wall clock, start-up included)"
  speakerlab extract --model "$out/base_model.ckpt" --wav-scp "$out/long/subset.scp" \
    --out-dir "$out/extract_cpu" --backend torch --device cpu --num-workers 0 --no-progress ||
    return 1
  result "$(python3 "$root/tools/gpu_check.py" cosines --a "$out/extract_cpu/embedding.scp" \
    --b "$out/extract_device/embedding.scp" --label "embeddings on $device vs CPU PyTorch (fp32)")"
}

part_restart() {
  local train=(experiment=eres2net "${common_data[@]}" "data.index=$out/base_index.tsv"
               data.segment_seconds=1.0 trainer.precision=fp32 trainer.deterministic=true
               trainer.batch_size=64 trainer.epochs=2 trainer.max_steps_per_epoch=5
               trainer.save_every_steps=3 "data.num_workers=4")
  if [ "$rehearse" = true ]; then
    train+=(model.m_channels=4 model.embedding_size=16 data.crop_seconds=0.5 trainer.batch_size=8
            data.num_workers=1 trainer.num_threads=1)
  fi
  rm -rf "$out/restart"
  CUDA_VISIBLE_DEVICES="$gpu" python3 "$root/tools/gpu_check.py" restart --out "$out/restart" \
    --epochs 2 --label "kill and restart, fp32 on $device" -- "${train[@]}" > "$out/restart.txt"
  local status=$?
  result "$(tail -1 "$out/restart.txt")"
  return $status
}

if [ -n "$part" ]; then
  case "$part" in
    base_fp32|base_bf16|base_fp16) base_run "${part#base_}" ;;
    *) "part_$part" ;;
  esac
  exit $?
fi

# ------------------------------------------------------------------------------------ driver

if [ "$rehearse" = false ] && [ -d "$root/.whl" ]; then
  # Packages the machine lacks, fetched beforehand as wheels; then this package itself.
  python3 -m pip install -q --no-index --find-links "$root/.whl" "$root"/.whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e "$root"
fi
if ! command -v python > /dev/null; then  # the recipe calls `python`
  mkdir -p "$out/bin" && ln -sf "$(command -v python3)" "$out/bin/python"
  export PATH="$out/bin:$PATH"
fi

started=$SECONDS
failed=0
{
  where="GPU $gpu"; [ "$rehearse" = true ] && where="rehearsal on the CPU"
  echo "# GPU check $(date '+%Y-%m-%d %H:%M') ($where)"
  python3 -c "import torch; print(f'- torch {torch.__version__}, ' + \
(torch.cuda.get_device_name($gpu) if torch.cuda.is_available() else 'no GPU visible'))"
} >> "$summary"

# name and time limit (seconds) of each part, in order
parts=(data:60 recipe:90 base_fp32:35 base_bf16:35 base_fp16:35 synthetic:45 extract:50
       restart:75)
for entry in "${parts[@]}"; do
  name=${entry%%:*}; limit=${entry##*:}
  if [ "$rehearse" = true ]; then
    limit=$((limit * 6))  # a loaded 2-core machine: the shrunk parts, with room to spare
    if [ "$name" = base_fp16 ]; then
      echo "- $name: skipped (fp16 needs a GPU)" >> "$summary"; continue
    fi
  else
    left=$((budget - (SECONDS - started)))
    if [ "$left" -lt 15 ]; then
      echo "- $name: skipped (the ${budget} s budget is spent)" >> "$summary"; continue
    fi
    [ "$limit" -gt "$left" ] && limit=$left
  fi
  begin=$SECONDS
  timeout -k 10 "$limit" bash "$self" --out "$out" --rehearse "$rehearse" --gpu "$gpu" \
    --workers "$workers" --part "$name" > "$out/$name.log" 2>&1
  status=$?
  seconds=$((SECONDS - begin))
  if [ $status -eq 124 ] || [ $status -eq 137 ]; then
    echo "- $name: TIMEOUT after $limit s (log $name.log)" >> "$summary"; failed=1
  elif [ $status -ne 0 ]; then
    echo "- $name: FAILED (exit $status, $seconds s): $(grep -v '^RESULT: ' "$out/$name.log" |
      tail -1)" >> "$summary"
    failed=1
  else
    echo "- $name: ok ($seconds s)" >> "$summary"
  fi
  grep '^RESULT: ' "$out/$name.log" | sed 's/^RESULT: /  - /' >> "$summary"
done
echo "- total: $((SECONDS - started)) s" >> "$summary"
cat "$summary"
exit $failed
