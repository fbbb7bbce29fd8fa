# Helpers shared by the launch scripts (sourced, not run).
#   run CMD...      print "+ CMD" (shell-quoted, copy-pastable) and run it, unless DRY_RUN=1
#   note TEXT       print "# TEXT" (what a dry run assumes, progress)
#   die TEXT        print to stderr and exit 2
# A dry run prints every command the script would run, one per line prefixed with "+ ", and runs none of them:
# no gcloud call is made, so "describe before create" checks print the describe and assume the resource is absent.

DRY_RUN=${DRY_RUN:-0}

_q() {  # one word: as is if it is plain, else single-quoted
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

quote() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(_q "$a")"; done
  printf '%s' "$out"
}

run() {
  echo "+ $(quote "$@")"
  [ "$DRY_RUN" = 1 ] && return 0
  "$@"
}

note() { echo "# $*"; }

die() { echo "error: $*" >&2; exit 2; }

need_value() {  # need_value FLAG VALUE: fail when a required option is empty
  [ -n "$2" ] || die "$1 is required (see --help)"
}

git_sha() { git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown; }

warn_dirty() {
  if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    echo "warning: uncommitted changes are not shipped: the code sent is commit $(git_sha)" >&2
  fi
}
