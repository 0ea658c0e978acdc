#!/usr/bin/env bash
# Build the docs as CI does (a stage of jobs/test.sh): warnings are errors.
#
#   bash docs/build.sh [OUT]        # default OUT: docs/_build/html; then open OUT/index.html
#
# Ends with one line, "docs: N pages, no warnings, in T s", the summary line of the stage.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$here/docs/_build/html}
start=$(date +%s.%N)
python -m sphinx -W --keep-going -q -b html "$here/docs" "$out"
awk -v a="$start" -v b="$(date +%s.%N)" -v n="$(find "$out" -maxdepth 1 -name '*.html' | wc -l)" \
    'BEGIN { printf "docs: %d pages, no warnings, in %.1fs\n", n, b - a }'
