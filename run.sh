#!/usr/bin/env bash
# Set up .venv if needed, then run refnorm's main job: the quick micro-batch study, which
# trains the small conv-net with several normalizers at per-device batch 2 and 32 and writes
# runs/study-quick/report.md with plots. Arguments replace the default ones
# (e.g. ./run.sh study for the full grid, ./run.sh gradcheck --all).
set -euo pipefail
cd "$(dirname "$0")"
REFNORM_EXTRAS="train" . scripts/setup.sh
if [ "$#" -eq 0 ]; then
  set -- study --quick --out runs/study-quick
fi
exec refnorm "$@"
