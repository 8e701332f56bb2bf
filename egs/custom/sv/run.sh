#!/usr/bin/env bash
# Speaker verification on your own data: train from scratch, or fine-tune a released model or
# one of yours (--init_from), then extract and score. The stages live in egs/sv.sh and the corpus
# options in ../corpus.sh. Examples (see --help for all options):
#   bash run.sh --source /data/my_speakers --gpus "0 1"          # folder of speaker folders
#   bash run.sh --source /data/kaldi/train --init_from iic/speech_eres2net_sv_en_voxceleb_16k
#   bash run.sh --train_dir data/train --test_dir data/test --trials "data/trials_a data/trials_b"
cd "$(dirname "$0")"
recipe_experiment=eres2net
recipe_mini_experiment=""
. ../corpus.sh
. ../../sv.sh "$@"
