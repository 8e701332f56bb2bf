# Kaldi/ESPnet-style option parsing, meant to be sourced by a recipe after it has set its defaults:
#
#   stage=1; gpus=""; . tools/parse_options.sh
#
# Each `--some-name VALUE` or `--some_name VALUE` (also `--some_name=VALUE`) sets the shell variable
# some_name, which must already exist: unknown options are errors, so typos never pass silently.
# `--help` prints $help_message. Parsing stops at `--`; what follows stays in "$@" (the recipes
# pass it on as Hydra overrides). Anything else that is not an option is an error.

__po_usage() {
  echo "${help_message:-usage: $0 [--option value ...] [-- hydra overrides ...]}"
}

__po_rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h)
      __po_usage; exit 0 ;;
    --)
      shift; __po_rest=("$@"); break ;;
    --*=*)
      __po_name="${1%%=*}"; __po_value="${1#*=}"; shift ;;
    --*)
      __po_name="$1"
      if [ $# -lt 2 ]; then echo "$0: option $1 needs a value" >&2; exit 2; fi
      __po_value="$2"; shift 2 ;;
    *)
      echo "$0: unexpected argument '$1' (options are --name value; Hydra overrides go after --)" >&2
      echo "run $0 --help for the options" >&2; exit 2 ;;
  esac
  __po_var="${__po_name#--}"; __po_var="${__po_var//-/_}"
  if [[ ! "$__po_var" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || [ -z "${!__po_var+set}" ]; then
    echo "$0: unknown option $__po_name" >&2; echo "run $0 --help for the options" >&2; exit 2
  fi
  printf -v "$__po_var" '%s' "$__po_value"
done
set -- "${__po_rest[@]+"${__po_rest[@]}"}"
unset __po_name __po_value __po_var __po_rest
