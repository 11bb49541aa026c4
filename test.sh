#!/usr/bin/env bash
# Set up .venv with the test, lesson, docs and mpi extras if needed, then run the whole suite:
# the pytest suite (hypothesis's ci profile unless HYPOTHESIS_PROFILE says otherwise) and
# the Sphinx build, which executes every lesson top to bottom (-W: warnings fail it).
# Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
REFNORM_EXTRAS="test,lessons,docs,mpi" . scripts/setup.sh
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
export REFNORM_REQUIRE_MPI=1  # the mpiexec tests fail, not skip, if MPI is missing
python -m pytest "$@"
python -m sphinx -T -W --keep-going -E -q -b html docs docs/_build/html
echo "docs built in docs/_build/html (every lesson executed)"
