# Shared by the launch scripts: print_command prints a command the way a shell would read it
# back (plain words bare, anything else single-quoted), so a --dry-run line can be pasted.
print_command() {
  printf '+'
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+~-]+$ ]]; then printf ' %s' "$arg"; else printf ' %s' "${arg@Q}"; fi
  done
  printf '\n'
}

# parse_args "NAME ZONE ..." "$@": --name=VALUE sets NAME, for each variable listed; --dry-run
# sets DRY_RUN=1; the words after -- go to EXTRA (train flags). Anything else is a one-line error
# followed by the calling script's usage().
parse_args() {
  local allowed=" $1 " key
  shift
  DRY_RUN="" EXTRA=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --) shift; EXTRA=("$@"); return ;;
      --?*=*)
        key="${1%%=*}"; key="${key#--}"; key="${key^^}"
        [[ "$allowed" == *" $key "* ]] || { echo "error: unknown argument $1" >&2; usage; }
        printf -v "$key" '%s' "${1#*=}" ;;
      *) echo "error: unknown argument $1" >&2; usage ;;
    esac
    shift
  done
}

# require VAR...: a one-line error naming the first missing flag, then usage().
require() {
  local var
  for var in "$@"; do
    [[ -n "${!var}" ]] || { echo "error: --${var,,}= is required" >&2; usage; }
  done
}

# gcs_workdir: WORKDIR must be gs://BUCKET/...; sets BUCKET and MOUNTED_WORKDIR, the path where
# the scripts mount the bucket with gcsfuse (the trainer reads its workdir as a local path).
gcs_workdir() {
  [[ "$WORKDIR" == gs://* ]] || { echo "error: --workdir=$WORKDIR must be a gs:// path" >&2; exit 2; }
  BUCKET="${WORKDIR#gs://}"; BUCKET="${BUCKET%%/*}"
  MOUNTED_WORKDIR="/gcs/${WORKDIR#gs://}"
}
