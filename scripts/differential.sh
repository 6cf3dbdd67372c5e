#!/usr/bin/env bash
# The randomized differential test at a size of your choice (docs/differential.md).
# Builds what the test loads (the epidemic binary, the backends, the recorder plugin),
# then runs tests/tests/differential.rs one backend at a time.
#
#   scripts/differential.sh                      # a million statements per backend
#   OPS=50000 scripts/differential.sh postgres   # one backend, another size
#   SEED=42 OPS=20000 scripts/differential.sh    # another seed
#
# Other knobs, passed through: EPIDEMIC_DIFF_KEYS, EPIDEMIC_DIFF_WRITERS,
# EPIDEMIC_DIFF_CATCH_UP_S, EPIDEMIC_DIFF_WITHOUT (replace,cascades,update-ignore).
set -euo pipefail
cd "$(dirname "$0")/.."

export EPIDEMIC_DIFF_OPS="${OPS:-1000000}"
[ -n "${SEED:-}" ] && export EPIDEMIC_DIFF_SEED="$SEED"
# A large run leaves the daemons a large backlog to drain at the end.
export EPIDEMIC_DIFF_CATCH_UP_S="${EPIDEMIC_DIFF_CATCH_UP_S:-$(( EPIDEMIC_DIFF_OPS / 50 + 600 ))}"

cargo build --quiet -p epidemic -p epidemic-backend-sqlite -p epidemic-backend-postgres \
    -p epidemic-backend-mysql -p epidemic-recorder
cargo build --quiet -p epidemic-tests --test differential

backends=("$@")
[ ${#backends[@]} -eq 0 ] && backends=(sqlite postgres mysql)
status=0
for b in "${backends[@]}"; do
    echo "== $b: $EPIDEMIC_DIFF_OPS statements, seed ${EPIDEMIC_DIFF_SEED:-default}"
    start=$(date +%s)
    if cargo test --quiet -p epidemic-tests --test differential -- --exact "$b" --nocapture; then
        echo "== $b: passed in $(( $(date +%s) - start )) s"
    else
        echo "== $b: FAILED after $(( $(date +%s) - start )) s"
        status=1
    fi
done
exit $status
