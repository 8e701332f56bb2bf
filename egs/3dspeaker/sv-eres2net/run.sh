#!/usr/bin/env bash
# ERes2Net on 3D-Speaker. The stages live in egs/sv.sh, the corpus in ../corpus.sh; this
# recipe only names its experiments. Example (see --help for all options):
#   bash run.sh --corpus mini          # simulate a mini corpus, train eres2net_mini on it, score
cd "$(dirname "$0")"
recipe_experiment=eres2net
recipe_mini_experiment=eres2net_mini
. ../corpus.sh
. ../../sv.sh "$@"
