# The 3D-Speaker corpus for egs/sv.sh (sourced by the sv-*/run.sh recipes): the real corpus,
# downloaded and prepared, or the built-in simulated mini corpus in the same layout.

corpus_name=3D-Speaker
corpus=3dspeaker        # 3dspeaker: the real corpus; mini: the built-in simulated corpus
raw_data=""             # corpus, MUSAN and RIRS_NOISES live here (default data/raw or data/mini_raw)
download=true           # --corpus 3dspeaker: download what is missing into --raw_data
mini_size=default       # --corpus mini: default | ci (a smaller corpus for continuous integration)

corpus_help="Corpus options (3D-Speaker):
  --corpus 3dspeaker|mini      real corpus (default) or the built-in simulated mini corpus; mini
                               trains the recipe's mini experiment unless --experiment says otherwise
  --raw_data DIR               where the corpus, MUSAN and RIRS_NOISES are (or go)
  --download true|false        download missing parts of the real corpus (default true)
  --mini_size default|ci       size of the simulated corpus"

corpus_setup() {
  mini=false
  case "$corpus" in
    3dspeaker) raw_data="${raw_data:-data/raw}" ;;
    mini) raw_data="${raw_data:-data/mini_raw}"; mini=true ;;
    *) die "--corpus must be 3dspeaker or mini, not '$corpus'" ;;
  esac
  case "$download" in true|false) ;; *) die "--download must be true or false, not '$download'" ;; esac
  case "$mini_size" in default|ci) ;; *) die "--mini_size must be default or ci, not '$mini_size'" ;; esac
  prepared="$data/3dspeaker"
  train_dir="$prepared/train"
  test_dir="$prepared/test"
  trials=("$prepared/trials/trials_cross_device" "$prepared/trials/trials_cross_distance"
               "$prepared/trials/trials_cross_dialect")
  noise_list="$data/musan/wav.scp"
  rir_list="$data/rirs/wav.scp"
}

corpus_prepare() {
  if [ -f "$prepared/.done" ]; then
    log "stage 1: $prepared already prepared (remove $prepared/.done to redo)"
    return
  fi
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
}
