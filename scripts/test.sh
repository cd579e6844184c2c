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
  # Two pytest-xdist workers: most tests wait (on a vLLM start, a browser, a child process), so on 2
  # cores the suite takes 20 min instead of 29-33 in one process. --dist loadgroup: the tests of the
  # shared vLLM server run on one worker, so a run still starts that server once, and every other
  # file runs whole on one worker, in its order (conftest). --durations: the slowest tests in CI's log.
  exec "$PY" -m pytest -p no:cacheprovider -ra --durations=25 -m "not isolated" -n 2 --dist loadgroup
fi
exec "$PY" -m pytest -p no:cacheprovider -ra "$@"
