#!/usr/bin/env bash
# Whether a call of the lent GPU machine carrying PATHS fits what a call takes, 64 MiB with the checkout
# (tracked and untracked-not-ignored files): bash scripts/gpu/fits.sh .gpu/data/train_color [...]
# Run it here before a session's calls (a call over the limit is refused, and a warm machine idles).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
LIMIT=$((64 * 1024 * 1024))
tree=$({ git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s -- 2>/dev/null |
       awk '{s += $1} END {print s + 0}')  # a tracked file deleted here has no size: it does not travel
for path in "$@"; do
    [ -e "$path" ] || { echo "missing $path: bash scripts/gpu/stage.sh ../shared/data stages it (DATA_ONLY=1: the data alone, in seconds)" >&2; exit 1; }
done
carry=0
[ $# -gt 0 ] && carry=$(du -sb -- "$@" | awk '{s += $1} END {print s + 0}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
total=$((tree + carry))
line="checkout $(mib "$tree") MiB + carried $(mib "$carry") MiB = $(mib "$total") of 64 MiB"
if [ "$total" -gt "$LIMIT" ]; then
    echo "too large: $line; carry less in this call (.gpu/data_a and .gpu/data_b hold train_color in halves)" >&2
    exit 1
fi
echo "fits: $line ($(mib $((LIMIT - total))) MiB to spare)"
