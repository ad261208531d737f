#!/usr/bin/env bash
# The prepared device run for a session with a GPU (about 10 minutes on one H200): every implementation,
# the Triton kernels included, is checked against the per-expert reference inside the benchmarks before it is
# timed. Run from the repository root on the GPU machine, where nothing is installed: PYTHONPATH=src.
# Results: ${OUT:-benchmarks/results}/<gpu>-<date>.json, <gpu>-<date>-train.json, -train-compiled.json and
# -cuda-graph.json; tables on stdout.
set -uo pipefail  # not -e: one failing step must not cost the others (the device time is spent once)
export PYTHONPATH=src
out=${OUT:-benchmarks/results}
mkdir -p "$out"
status=0
step() {
    echo "+ $*" >&2
    "$@" || { echo "gpu_session: FAILED (exit $?): $*" >&2; status=1; }
}
name=$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")-$(date +%F)
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
step python -m mhmoe bench layer --device cuda --shapes all --repeats 10 --json "$out/$name.json"
step python -m mhmoe bench train --device cuda --also recompute,triton,triton-recompute --repeats 10 \
    --json "$out/$name-train.json"
# then compiled steps (inductor; about a minute of compilation per variant)
step python -m mhmoe bench train --device cuda --compile --no-loop --repeats 10 --json "$out/$name-train-compiled.json"
# last: a failed CUDA-graph capture can leave the context unusable (default path and Triton kernels, the GPU shapes)
step python -m mhmoe bench layer --device cuda --cuda-graph --json "$out/$name-cuda-graph.json"
exit $status
