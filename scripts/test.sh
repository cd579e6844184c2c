#!/usr/bin/env bash
# Install whatever is missing (test tools included), lint, then run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
PY=${PYTHON:-python3}
"$PY" -m ruff check sage_ft tests bench scripts webui.py
# pytest exits 5 when it collects no test: that is a failure here, never a pass.
if [ "$#" -eq 0 ]; then
  # Tests that measure this process tree's memory run first, in a pytest process of their own: after
  # hundreds of other tests in the same session their child's peak RSS was seen inflated 2x.
  "$PY" -m pytest -p no:cacheprovider -ra -m isolated
  # --durations: the slowest tests in CI's log, to keep the suite well under 30 minutes
  exec "$PY" -m pytest -p no:cacheprovider -ra --durations=25 -m "not isolated"
fi
exec "$PY" -m pytest -p no:cacheprovider -ra "$@"
