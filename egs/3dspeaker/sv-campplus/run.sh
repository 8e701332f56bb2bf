#!/usr/bin/env bash
# CAM++ on 3D-Speaker. The stages live in egs/sv.sh, the corpus in ../corpus.sh; this
# recipe only names its experiments. Example (see --help for all options):
#   bash run.sh --corpus mini          # simulate a mini corpus, train campplus_mini on it, score
cd "$(dirname "$0")"
recipe_experiment=campplus
recipe_mini_experiment=campplus_mini
. ../corpus.sh
. ../../sv.sh "$@"
