#!/usr/bin/env bash
# Install whatever is missing, then start the web UI on the built-in demo model.
# Extra arguments go to webui.py, e.g. `bash scripts/run.sh --lang zh --port 7861`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" webui.py "$@"
