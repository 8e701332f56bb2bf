#!/usr/bin/env bash
# ECAPA-TDNN on 3D-Speaker. The stages live in ../sv.sh; this recipe only picks the experiment.
# Example: bash run.sh --corpus mini --stage 1 --stop_stage 5        (see --help for all options)
cd "$(dirname "$0")"
. ../sv.sh --experiment ecapa_tdnn "$@"
