#!/usr/bin/env bash
# Set up .venv with the test, lesson, docs, mpi and dev extras (and PyTorch's CPU build, for
# the fingerprints of refnorm.testing) if needed, then run the whole suite: ruff and mypy,
# the pytest suite (hypothesis's ci profile unless HYPOTHESIS_PROFILE says otherwise), the
# layer suites once more on the fast path and the trainer's on the reference, the Sphinx
# build, which executes every lesson top to bottom (-W: warnings fail it), and then tests/site,
# which opens every built page in Debian's Chromium (installed with apt-get when missing) and
# saves a screenshot of each in docs/_build/screenshots/. Arguments go to the first pytest run.
set -euo pipefail
cd "$(dirname "$0")"
REFNORM_EXTRAS="test,lessons,docs,mpi,dev" . scripts/setup.sh
if ! python -c 'import torch' >/dev/null 2>&1; then
  # torch is an optional extra, never a dependency. PyPI's Linux wheel is the CUDA build
  # (gigabytes of CUDA libraries); PyTorch's CPU index serves 2.13.0+cpu, which pip prefers
  # to 2.13.0 (a local version sorts after its public one). Where that index cannot be
  # reached, pip warns once and takes what its other indexes offer.
  echo "installing torch 2.13.0 (CPU) for the PyTorch fingerprints ..." >&2
  python -m pip install --disable-pip-version-check -q --retries 1 "torch==2.13.0" \
      --extra-index-url https://download.pytorch.org/whl/cpu >&2 ||
    echo "warning: torch could not be installed; the PyTorch tests will be skipped" >&2
fi
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
export REFNORM_REQUIRE_MPI=1  # the mpiexec tests fail, not skip, if MPI is missing
export REFNORM_REQUIRE_BROWSER=1  # and tests/site if Chromium is
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "installing Debian's chromium and chromium-driver for tests/site ..." >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      $sudo apt-get install -y -qq chromium chromium-driver; } >&2 ||
    echo "warning: chromium could not be installed; tests/site will fail" >&2
fi
ruff check refnorm tests lessons  # lessons/ruff.toml: their line length only
mypy
python -m pytest --ignore=tests/site "$@"  # tests/site needs the build below
# Layers default to the reference path and the trainer to the fast one: the layer suites once
# more on the fast path, the trainer's once more on the reference.
REFNORM_PATH=fast python -m pytest -q -p no:cacheprovider tests/test_layer.py \
  tests/norms/test_base.py tests/nn/test_layers.py
REFNORM_PATH=reference python -m pytest -q -p no:cacheprovider tests/train/test_loop.py
python -m sphinx -T -W --keep-going -E -q -b html docs docs/_build/html
echo "docs built in docs/_build/html (every lesson executed)"
python -m pytest -q -p no:cacheprovider tests/site
echo "site checked in Chromium; screenshots in docs/_build/screenshots/"
