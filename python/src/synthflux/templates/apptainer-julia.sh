#!/bin/bash
# Stands in for `julia` in the classify job: runs the classifier image with Apptainer (or
# Singularity) instead. Written by `synthflux submit --classify-backend apptainer`.
# The driver calls `julia --project=DIR DIR/flux_model.jl ARGS...`; the image's own entry point
# is that same command with its own project, so only ARGS are passed on.
set -euo pipefail
runtime=$(command -v apptainer || command -v singularity || true)
if [[ -z $runtime ]]; then
    echo "flux_model: error: apptainer (or singularity) not found on $(hostname)" >&2
    exit 127
fi
args=() binds=()
for arg in "$@@"; do
    case $arg in
    --project=* | *.jl) continue ;;
    esac
    args+=("$arg")
    # Every absolute path argument (inputs, weights, output) is bound at the same path.
    if [[ $arg == /* && -e $arg ]]; then
        [[ -d $arg ]] && binds+=(--bind "$arg") || binds+=(--bind "$(dirname "$arg")")
    fi
done
exec "$runtime" run --cleanenv "${binds[@@]}" @{sif} "${args[@@]}"
