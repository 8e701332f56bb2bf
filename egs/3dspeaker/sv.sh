#!/usr/bin/env bash
# Speaker verification on 3D-Speaker: the stages shared by every sv-* recipe of this corpus.
# The recipes (sv-eres2net/run.sh, sv-campplus/run.sh, sv-ecapa/run.sh) only choose the
# experiment; run them from their own folder, where data/ and exp/ are written.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# ---- options (each settable as --name value; see --help) ----
stage=1
stop_stage=5
experiment=eres2net     # Hydra experiment in conf/experiment/
lm_experiment=""        # stage 6: large-margin fine-tuning experiment (e.g. eres2net_lm)
corpus=3dspeaker        # 3dspeaker: the real corpus; mini: the built-in simulated corpus
raw_data=""             # corpus, MUSAN and RIRS_NOISES live here (default data/raw or data/mini_raw)
download=true           # --corpus 3dspeaker: download what is missing into --raw_data
mini_size=default       # --corpus mini: default | ci (a smaller corpus for continuous integration)
data=data               # prepared lists go here
exp=""                  # experiment folder (default exp/<experiment>, or exp/pretrained)
pretrained=""           # skip training: evaluate this registry id or checkpoint path
gpus=""                 # e.g. "0 1 2 3"; empty trains on CPU
nproc=1                 # CPU training processes when --gpus is empty (gloo)
nnodes=1
node_rank=0
master_addr=127.0.0.1
master_port=29500
extract_batch_size=16
calibrate=false         # true: hold out calibration speakers from training, calibrate in stage 5

help_message="usage: $0 [options] [-- hydra overrides for training]

Stages: 1 data download/simulation and preparation, 2 training index, 3 training,
4 export + embedding extraction, 5 scoring (results table + DET plot),
6 (optional, with --lm_experiment) large-margin fine-tuning, extraction and scoring.

Options:
  --stage N / --stop_stage N   run stages N..M (default 1..5)
  --experiment NAME            conf/experiment/NAME.yaml (default $experiment)
  --lm_experiment NAME         fine-tuning experiment of stage 6 (e.g. eres2net_lm)
  --corpus 3dspeaker|mini      real corpus (default) or the built-in simulated mini corpus
  --raw_data DIR               where the corpus, MUSAN and RIRS_NOISES are (or go)
  --download true|false        download missing parts of the real corpus (default true)
  --mini_size default|ci       size of the simulated corpus
  --data DIR / --exp DIR       prepared lists / experiment folder
  --pretrained ID|PATH         evaluate a released model id or a checkpoint instead of training
  --gpus \"0 1 ...\"             GPUs to train on (NCCL); empty: CPU (gloo)
  --nproc N                    CPU processes when --gpus is empty
  --nnodes N --node_rank R --master_addr HOST --master_port PORT   multi-node training
  --extract_batch_size N       utterances per extraction batch
  --calibrate true|false       hold 200 training speakers (10 % at most, 4 at least) out of
                               training (stage 2) and fit a score calibration on them (stage 5):
                               calibrated results in <exp>/scores_calibrated, and
                               <exp>/model_calibrated.ckpt for verify
Everything after -- is passed to training as Hydra overrides, e.g. -- trainer.epochs=10 optim.lr=0.1"

. "$root/tools/parse_options.sh"
train_overrides=("$@")

# Use the project's virtual environment when it exists and none is active.
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$root/.venv/bin/python" ]; then
  export PATH="$root/.venv/bin:$PATH"
fi

die() { echo "$0: error: $*" >&2; exit 1; }
log() { echo "[$(date '+%H:%M:%S')] $*" >&2; }
run_stage() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }

case "$corpus" in
  3dspeaker) raw_data="${raw_data:-data/raw}" ;;
  mini) raw_data="${raw_data:-data/mini_raw}" ;;
  *) die "--corpus must be 3dspeaker or mini, not '$corpus'" ;;
esac
case "$download" in true|false) ;; *) die "--download must be true or false, not '$download'" ;; esac
case "$mini_size" in default|ci) ;; *) die "--mini_size must be default or ci, not '$mini_size'" ;; esac
case "$calibrate" in true|false) ;; *) die "--calibrate must be true or false, not '$calibrate'" ;; esac
[ "$calibrate" = false ] || [ -z "$pretrained" ] || \
  die "--calibrate needs a model trained here: a released model has seen every training speaker"
[ -f "$root/conf/experiment/$experiment.yaml" ] || \
  die "unknown experiment '$experiment' (have: $(cd "$root/conf/experiment" && ls | sed 's/\.yaml$//' | tr '\n' ' '))"
if [ -n "$lm_experiment" ] && [ ! -f "$root/conf/experiment/$lm_experiment.yaml" ]; then
  die "unknown --lm_experiment '$lm_experiment'"
fi
if [ -n "$pretrained" ]; then exp="${exp:-exp/pretrained}"; else exp="${exp:-exp/$experiment}"; fi

prepared="$data/3dspeaker"
trials=("$prepared/trials/trials_cross_device" "$prepared/trials/trials_cross_distance"
        "$prepared/trials/trials_cross_dialect")
train_dir="$prepared/train"
[ "$calibrate" = false ] || train_dir="$prepared/train_fit"  # without the calibration speakers
num_gpus=$(echo $gpus | wc -w)

# launch CMD...: run a speakerlab command on every process of this node (torchrun) or directly.
launch() {
  if [ "$num_gpus" -gt 0 ]; then
    CUDA_VISIBLE_DEVICES="${gpus// /,}" torchrun --nnodes "$nnodes" --node_rank "$node_rank" \
      --master_addr "$master_addr" --master_port "$master_port" --nproc_per_node "$num_gpus" \
      -m speakerlab "$@"
  elif [ "$nproc" -gt 1 ] || [ "$nnodes" -gt 1 ]; then
    torchrun --nnodes "$nnodes" --node_rank "$node_rank" --master_addr "$master_addr" \
      --master_port "$master_port" --nproc_per_node "$nproc" -m speakerlab "$@"
  else
    speakerlab "$@"
  fi
}

# train EXPERIMENT EXP_DIR [overrides...]
train() {
  local experiment_name=$1 exp_dir=$2; shift 2
  local device=cpu; [ "$num_gpus" -gt 0 ] && device=cuda
  launch train "experiment=$experiment_name" "exp_dir=$exp_dir" "trainer.device=$device" \
    "data.train_dir=$train_dir" "data.index=$exp_dir/train_index.tsv" \
    "data.noise_list=$data/musan/wav.scp" "data.rir_list=$data/rirs/wav.scp" "$@"
}

# extract_embeddings MODEL EXP_DIR: whole-utterance embeddings of the test set (resumable).
extract_embeddings() {
  log "extracting test embeddings with $1 into $2/embeddings/test"
  launch extract --model "$1" --wav-scp "$prepared/test/wav.scp" \
    --out-dir "$2/embeddings/test" --batch-size "$extract_batch_size"
}

# score_trials EXP_DIR: score files, results table (printed) and DET plot of the trial lists.
score_trials() {
  [ -f "$1/embeddings/test/embedding.scp" ] || die "no embeddings in $1/embeddings/test: run stage 4 first"
  log "scoring ${#trials[@]} trial lists into $1/scores"
  speakerlab score --embeddings "$1/embeddings/test/embedding.scp" --trials "${trials[@]}" \
    --out-dir "$1/scores"
}

# hold_out_speakers: 200 training speakers (10 % at most, 4 at least; seed 0) go to
# $prepared/calibration with a balanced list of up to 20,000 target and as many non-target
# trials; the other speakers go to $train_dir.
hold_out_speakers() {
  speakerlab make-trials --data-dir "$prepared/train" --speakers 200 \
    --out-dir "$prepared/calibration" --rest-dir "$train_dir"
}

# calibrate_model EXP_DIR MODEL: fit a calibration on the held-out speakers' trials (refused if
# EXP_DIR was trained on them), score the test lists with it, and write MODEL with it inside.
calibrate_model() {
  local trained_on
  trained_on=$(python -c 'import sys; from omegaconf import OmegaConf
print(OmegaConf.load(sys.argv[1]).data.train_dir)' "$1/config.yaml")
  [ "$(realpath -m "$trained_on")" = "$(realpath -m "$train_dir")" ] || \
    die "$1 was trained on $trained_on, which holds the calibration speakers: rerun from stage 2"
  log "calibrating $2 on the held-out speakers in $prepared/calibration"
  launch extract --model "$2" --wav-scp "$prepared/calibration/wav.scp" \
    --out-dir "$1/embeddings/calibration" --batch-size "$extract_batch_size"
  speakerlab calibrate --embeddings "$1/embeddings/calibration/embedding.scp" \
    --trials "$prepared/calibration/trials" --out "$1/calibration.json" \
    --model "$2" --model-out "${2%.ckpt}_calibrated.ckpt"
  speakerlab score --embeddings "$1/embeddings/test/embedding.scp" --trials "${trials[@]}" \
    --calibration "$1/calibration.json" --out-dir "$1/scores_calibrated"
}

if run_stage 1; then
  if [ -f "$prepared/.done" ]; then
    log "stage 1: $prepared already prepared (remove $prepared/.done to redo)"
  else
    if [ "$corpus" = mini ]; then
      if [ ! -f "$raw_data/.done" ]; then
        log "stage 1: simulating the mini corpus in $raw_data"
        mini_args=()
        [ "$mini_size" = ci ] && mini_args=(--num_train_speakers 16 --num_test_speakers 8)
        python "$root/local/simulate_mini_corpus.py" --out_dir "$raw_data" "${mini_args[@]}"
        touch "$raw_data/.done"
      fi
    elif [ "$download" = true ]; then
      log "stage 1: downloading missing parts of 3D-Speaker, MUSAN and RIRS_NOISES into $raw_data"
      python "$root/local/download_3dspeaker.py" --download_dir "$raw_data/download" --raw_dir "$raw_data"
    fi
    log "stage 1: preparing lists in $data"
    python "$root/local/prepare_3dspeaker.py" --corpus_dir "$raw_data/3dspeaker" --data_dir "$data" \
      --musan_dir "$raw_data/musan" --rirs_dir "$raw_data/RIRS_NOISES"
    touch "$prepared/.done"
  fi
fi

if run_stage 2 && [ -z "$pretrained" ]; then
  log "stage 2: training index"
  if [ "$calibrate" = true ]; then hold_out_speakers; fi
  speakerlab make-index --data_dir "$train_dir" --out "$exp/train_index.tsv" \
    "experiment=$experiment" "${train_overrides[@]+"${train_overrides[@]}"}"
fi

if run_stage 3 && [ -z "$pretrained" ]; then
  log "stage 3: training $experiment in $exp"
  train "$experiment" "$exp" "${train_overrides[@]+"${train_overrides[@]}"}"
fi

if run_stage 4; then
  model="$pretrained"
  if [ -z "$pretrained" ]; then
    model="$exp/model.ckpt"
    log "stage 4: exporting the trained embedding model to $model"
    speakerlab export --checkpoint "$exp" --out "$model"
  fi
  extract_embeddings "$model" "$exp"
fi

if run_stage 5; then
  log "stage 5: scoring"
  score_trials "$exp"
  if [ "$calibrate" = true ]; then calibrate_model "$exp" "$exp/model.ckpt"; fi
fi

if run_stage 6 && [ -n "$lm_experiment" ]; then
  [ -z "$pretrained" ] || die "stage 6 fine-tunes a model trained in stage 3; not with --pretrained"
  lm_exp="${exp}_lm"
  log "stage 6: large-margin fine-tuning ($lm_experiment) from $exp into $lm_exp"
  speakerlab make-index --data_dir "$train_dir" --out "$lm_exp/train_index.tsv" \
    "experiment=$lm_experiment" "${train_overrides[@]+"${train_overrides[@]}"}"
  train "$lm_experiment" "$lm_exp" "trainer.init_from=$exp" \
    "${train_overrides[@]+"${train_overrides[@]}"}"
  speakerlab export --checkpoint "$lm_exp" --out "$lm_exp/model.ckpt"
  extract_embeddings "$lm_exp/model.ckpt" "$lm_exp"
  score_trials "$lm_exp"
  if [ "$calibrate" = true ]; then calibrate_model "$lm_exp" "$lm_exp/model.ckpt"; fi
fi
