#!/usr/bin/env bash
# Moves constraints.txt to the newest releases that requirements*.txt admit, once the suite passes on them.
#
#   scripts/refresh_constraints.sh [REQUIREMENT ...]    e.g. scripts/refresh_constraints.sh 'torch==2.13.0'
#
# constraints.txt pins every package of the venv that README's commands build, so a fresh install gets the
# combination the suite last passed with instead of whatever is newest that day. This script installs the
# newest releases into a scratch venv (no -c; REQUIREMENTs hold packages back, e.g. torch at the CPU wheel
# our machines hold instead of a CUDA build of several GB), with every extra that a user installs on
# purpose, runs the whole suite there and, only if it passes, writes the venv's `pip freeze` (the project
# itself excluded) into constraints.txt. Local version labels are dropped (torch 2.13.0+cpu is pinned as
# 2.13.0, which matches the CPU and the PyPI wheel alike). Review the diff, then commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/pip" install -e ".[test,tensorboard]" "$@"
"$scratch/venv/bin/python" -m pytest -q -n 2 --dist loadfile tests
{
  echo "# The exact versions the test suite last passed with: pip install -c constraints.txt -e \".[test]\""
  echo "# (README set-up commands, .ci/run). Written by scripts/refresh_constraints.sh; do not edit by hand."
  "$scratch/venv/bin/pip" freeze --exclude-editable | sed -E 's/^([^=]+==[^+]+)\+.*$/\1/'
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages; review with: git diff constraints.txt"
