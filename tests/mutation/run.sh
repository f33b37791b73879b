#!/usr/bin/env bash
# Mutation testing of unitgen's core modules with mutmut (see docs/testing.md).
#   tests/mutation/run.sh                          every core module
#   tests/mutation/run.sh unitgen/spec/ports.py    only the modules named
# It works on a copy of the checkout (tracked files plus uncommitted edits) in
# $UNITGEN_MUTATION_DIR (default: /tmp/unitgen-mutation), runs only the fast
# offline tests against each mutant, prints a score per module and every
# surviving mutant, and leaves the copy there for `mutmut show NAME`.
# Not run by CI: it takes minutes, and a survivor needs a person to judge it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
py="$repo/.venv/bin/python"
[ -x "$py" ] || py=python3
if ! "$py" -c 'import mutmut' 2>/dev/null; then
    echo "mutation: installing mutmut into $("$py" -c 'import sys; print(sys.prefix)')" >&2
    "$py" -m pip install -q 'mutmut>=3.8,<4'
fi
cd "$repo"
exec "$py" -m tests.mutation "$@"
