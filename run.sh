#!/usr/bin/env bash
# Set up .venv if needed, then run refnorm's main job: check every registered normalizer's
# backward against finite differences. Arguments replace the default ones.
set -euo pipefail
cd "$(dirname "$0")"
REFNORM_EXTRAS="" . scripts/setup.sh
if [ "$#" -eq 0 ]; then
  set -- gradcheck --all
fi
exec refnorm "$@"
