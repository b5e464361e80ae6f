#!/usr/bin/env bash
# mptrain default corpus: writes data/kjv.txt (relative to the repository root), the King James Bible from
# Debian's bible-kjv package (public domain), if it is not there yet. Dumped with
#
#   bible -f Gen1:1-Rev22:21
#
# where -f turns pretty-printing off: one verse per line, preceded by its reference ("Ge1:1 In the beginning
# ..."), no line wrapping, no pager, plain ASCII; 31,102 lines, 4,404,412 bytes with bible-kjv 4.38. The
# trainer reads it as bytes (vocabulary 256) and keeps the last 5% for validation.
#
# Idempotent: an existing non-empty data/kjv.txt is kept. The file is written to a temporary name in data/
# and renamed into place, so an interrupted run never leaves a partial corpus. Needs the `bible` program
# (package bible-kjv, installed by launch/setup.sh).
#
#   bash launch/corpus.sh
set -euo pipefail
cd "$(dirname "$0")/.."

out=data/kjv.txt

summary() { # $1: "kept" or "written"
  local bytes lines
  bytes=$(wc -c <"$out")
  lines=$(wc -l <"$out")
  echo "corpus: $out $1: $bytes bytes ($(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1e6 }') MB), $lines lines," \
    "from '$(head -n 1 "$out" | cut -d ' ' -f 1)' to '$(tail -n 1 "$out" | cut -d ' ' -f 1)'"
}

if [ -s "$out" ]; then
  summary kept
  exit 0
fi

if ! command -v bible >/dev/null 2>&1; then
  echo "corpus: error: the 'bible' program is missing (Debian package bible-kjv); run: bash launch/setup.sh" >&2
  exit 1
fi

echo "corpus: writing $out (bible -f Gen1:1-Rev22:21)"
mkdir -p data
tmp=$(mktemp data/.kjv.txt.XXXXXX)
trap 'rm -f "$tmp"' EXIT
# stdin from /dev/null: with references on the command line bible prints them and exits; it must never wait
# for interactive input.
bible -f Gen1:1-Rev22:21 </dev/null >"$tmp"

bytes=$(wc -c <"$tmp")
if [ "$bytes" -lt 4000000 ] || ! tail -n 1 "$tmp" | grep -q '^Rev22:21 '; then
  echo "corpus: error: 'bible -f Gen1:1-Rev22:21' wrote $bytes bytes, not the whole text" \
    "(~4.4 MB ending at Rev22:21)" >&2
  exit 1
fi
chmod 644 "$tmp"
mv -f "$tmp" "$out"
trap - EXIT
summary written
