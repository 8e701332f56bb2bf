# Your own corpus for egs/sv.sh (sourced by egs/custom/sv/run.sh): a folder of speaker folders or
# a Kaldi data dir, prepared by local/prepare_folder.py (--source), or lists you prepared yourself
# (--train_dir, --test_dir, --trials).

corpus_name="your corpus"
source=""               # folder tree <source>/<speaker>/**/*.{wav,flac}, or a Kaldi dir (wav.scp, utt2spk)
train_dir=""            # or ready lists: a Kaldi dir to train on (wav.scp, utt2spk)
test_dir=""             # ... a Kaldi dir of the utterances the trials name (wav.scp)
trials=""               # ... trial lists "enrol test target|nontarget", space separated
test_fraction=0.1       # --source: share of speakers held out for the test part
num_test_speakers=""    # --source: number of held-out speakers (overrides the fraction)
split_seed=0            # --source: seed of the speaker split
num_trials=20000        # --source: trials generated from the test part (half target)
trials_seed=0           # --source: seed of the trials
convert_dir=""          # --source: convert audio that is not 16 kHz mono into this folder
skip_unreadable=false   # --source: leave out unreadable files instead of stopping
noise_list=""           # wav.scp of noise recordings for augmentation (e.g. MUSAN's); empty: none
rir_list=""             # wav.scp of room impulse responses for augmentation; empty: none

corpus_help="Corpus options (your data; either --source, or --train_dir/--test_dir/--trials):
  --source DIR                 <DIR>/<speaker>/**/*.{wav,flac}, or a Kaldi dir (wav.scp, utt2spk),
                               prepared by stage 1 into <--data>/custom (local/prepare_folder.py)
  --test_fraction F / --num_test_speakers N   speakers held out for testing (default 0.1)
  --split_seed N / --num_trials N / --trials_seed N   speaker split and generated trials
  --convert_dir DIR            convert audio that is not 16 kHz mono into DIR (else: listed, stop)
  --skip_unreadable true|false leave out unreadable files (default false: listed, stop)
  --train_dir DIR --test_dir DIR --trials \"F1 F2\"   your own lists instead of --source
  --noise_list F --rir_list F  wav.scp files for noise and reverberation augmentation (optional)"

corpus_setup() {
  mini=false
  prepared="$data/custom"
  case "$skip_unreadable" in true|false) ;; *) die "--skip_unreadable must be true or false" ;; esac
  if [ -n "$source" ]; then
    [ -z "$train_dir$test_dir$trials" ] || \
      die "give either --source or --train_dir/--test_dir/--trials, not both"
    [ -d "$source" ] || die "--source $source: not a directory (relative paths start in $PWD)"
    train_dir="$prepared/train"
    test_dir="$prepared/test"
    trials="$prepared/trials/test_trials"
  elif [ -z "$train_dir$test_dir$trials" ] && [ -f "$prepared/.done" ]; then
    train_dir="$prepared/train"  # prepared by an earlier run with --source
    test_dir="$prepared/test"
    trials="$prepared/trials/test_trials"
  fi
  read -ra trials <<< "$trials"  # the option's list becomes the array of trial lists
}

corpus_prepare() {
  if [ -n "$source" ]; then
    # Always from the source as it is now: reading headers is quick, conversions are cached by
    # content, and the same source and options give the same lists.
    log "stage 1: preparing $source into $prepared"
    rm -f "$prepared/.done"
    prepare_args=(--test_fraction "$test_fraction" --split_seed "$split_seed"
                  --num_trials "$num_trials" --trials_seed "$trials_seed")
    [ -n "$num_test_speakers" ] && prepare_args+=(--num_test_speakers "$num_test_speakers")
    [ -n "$convert_dir" ] && prepare_args+=(--convert_dir "$convert_dir")
    [ "$skip_unreadable" = true ] && prepare_args+=(--skip_unreadable)
    python "$root/local/prepare_folder.py" --source "$source" --out_dir "$prepared" \
      "${prepare_args[@]}"
    touch "$prepared/.done"
    return
  fi
  [ -n "$train_dir$test_dir${trials[*]-}" ] || \
    die "stage 1: give --source DIR (a folder of speaker folders, or a Kaldi dir), or your lists with --train_dir, --test_dir and --trials"
  log "stage 1: using the lists given"
  local missing=()
  if [ -z "$pretrained" ]; then
    for f in "$train_dir/wav.scp" "$train_dir/utt2spk"; do [ -f "$f" ] || missing+=("$f"); done
  fi
  [ -f "$test_dir/wav.scp" ] || missing+=("$test_dir/wav.scp")
  [ "${#trials[@]}" -gt 0 ] || missing+=("--trials")
  for f in "${trials[@]}"; do [ -f "$f" ] || missing+=("$f"); done
  [ "${#missing[@]}" -eq 0 ] || \
    die "stage 1: missing ${missing[*]} (relative paths start in $PWD)"
}
