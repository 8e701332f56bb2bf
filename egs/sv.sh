#!/usr/bin/env bash
# Speaker verification: the stages shared by every recipe, whatever the corpus. A recipe's run.sh
# names its experiments, sources its corpus file (options and stage 1) and then this script, from
# its own folder, where data/ and exp/ are written; docs/recipes.md says how a corpus plugs in.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# ---- options (each settable as --name value; see --help) ----
stage=1
stop_stage=5
experiment=""           # Hydra experiment in conf/experiment/ (default: the recipe's, or its mini one)
lm_experiment=""        # stage 6 experiment (default: <experiment>_lm, or <base>_lm_mini for *_mini)
init_from=""            # stage 3 starts from this model: a registry id, checkpoint or experiment folder
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

Stages: 1 data (${corpus_name:-corpus} preparation), 2 training index, 3 training,
4 export + embedding extraction, 5 scoring (results table + DET plot),
6 large-margin fine-tuning of the stage-3 model, extraction and scoring.

Options:
  --stage N / --stop_stage N   run stages N..M (default 1..5)
  --experiment NAME            conf/experiment/NAME.yaml (default ${recipe_experiment:-none}${recipe_mini_experiment:+; $recipe_mini_experiment with --corpus mini})
  --lm_experiment NAME         stage 6 experiment (default <experiment>_lm; <name>_lm_mini for
                               <name>_mini)
  --init_from ID|PATH          fine-tune from a released model id, a checkpoint or an experiment
                               folder: its embedding model, a classifier sized for these speakers
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
${corpus_help:-}
Relative paths start in the recipe folder, where data/ and exp/ are written. Everything after --
is passed to training as Hydra overrides, e.g. -- trainer.epochs=10 optim.lr=0.1"

. "$root/tools/parse_options.sh"
train_overrides=("$@")

# Use the project's virtual environment when it exists and none is active.
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$root/.venv/bin/python" ]; then
  export PATH="$root/.venv/bin:$PATH"
fi

die() { echo "$0: error: $*" >&2; exit 1; }
log() { echo "[$(date '+%H:%M:%S')] $*" >&2; }
run_stage() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }
have_experiment() { [ -f "$root/conf/experiment/$1.yaml" ]; }
experiments() { (cd "$root/conf/experiment" && ls | sed 's/\.yaml$//' | tr '\n' ' '); }

corpus_setup
case "$calibrate" in true|false) ;; *) die "--calibrate must be true or false, not '$calibrate'" ;; esac
[ "$calibrate" = false ] || [ -z "$pretrained" ] || \
  die "--calibrate needs a model trained here: a released model has seen every training speaker"
full_train_dir="$train_dir"
[ "$calibrate" = false ] || train_dir="$prepared/train_fit"  # without the calibration speakers

if [ -z "$experiment" ]; then
  experiment="$recipe_experiment"
  if [ "$mini" = true ] && [ -n "${recipe_mini_experiment:-}" ]; then
    experiment="$recipe_mini_experiment"
  fi
fi
have_experiment "$experiment" || die "unknown experiment '$experiment' (have: $(experiments))"
# The large-margin experiment that goes with an experiment: eres2net_lm, or eres2net_lm_mini.
lm_default="${experiment%_mini}_lm"; [ "$experiment" != "${experiment%_mini}" ] && lm_default+=_mini
if [ -z "$lm_experiment" ]; then
  have_experiment "$lm_default" && lm_experiment="$lm_default"
elif ! have_experiment "$lm_experiment"; then
  die "unknown --lm_experiment '$lm_experiment' (have: $(experiments))"
fi
if [ -n "$pretrained" ]; then exp="${exp:-exp/pretrained}"; else exp="${exp:-exp/$experiment}"; fi
num_gpus=$(echo $gpus | wc -w)
if [ -n "$pretrained" ]; then
  log "stages $stage-$stop_stage: evaluating $pretrained in $exp"
else
  log "stages $stage-$stop_stage: experiment $experiment in $exp (stage 6: ${lm_experiment:-none})"
fi

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
    "data.noise_list=${noise_list:-null}" "data.rir_list=${rir_list:-null}" "$@"
}

# extract_embeddings MODEL EXP_DIR: whole-utterance embeddings of the test set (resumable).
extract_embeddings() {
  log "extracting test embeddings with $1 into $2/embeddings/test"
  launch extract --model "$1" --wav-scp "$test_dir/wav.scp" \
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
  speakerlab make-trials --data-dir "$full_train_dir" --speakers 200 \
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
  corpus_prepare
fi

if run_stage 2 && [ -z "$pretrained" ]; then
  log "stage 2: training index"
  if [ "$calibrate" = true ]; then hold_out_speakers; fi
  speakerlab make-index --data_dir "$train_dir" --out "$exp/train_index.tsv" \
    "experiment=$experiment" "${train_overrides[@]+"${train_overrides[@]}"}"
fi

if run_stage 3 && [ -z "$pretrained" ]; then
  log "stage 3: training $experiment in $exp${init_from:+ from $init_from}"
  train "$experiment" "$exp" ${init_from:+"trainer.init_from=$init_from"} \
    "${train_overrides[@]+"${train_overrides[@]}"}"
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

if run_stage 6; then
  [ -z "$pretrained" ] || die "stage 6 fine-tunes a model trained in stage 3; not with --pretrained"
  [ -n "$lm_experiment" ] || \
    die "stage 6: no large-margin experiment $lm_default for $experiment; give --lm_experiment"
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
