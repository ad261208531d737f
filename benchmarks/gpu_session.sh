#!/usr/bin/env bash
# The prepared device run for a session with a GPU (about 10 minutes on one H200): every implementation,
# the Triton kernels included, is checked against the per-expert reference inside the benchmarks before it is
# timed. Run from the repository root on the GPU machine, where nothing is installed: PYTHONPATH=src.
#
#     bash benchmarks/gpu_session.sh [PARTS]    PARTS: any of layer train compiled graph (default: all four)
#
# One call per part fits a per-command time limit while the machine stays warm; `graph` goes last (a failed
# CUDA-graph capture can leave the context unusable). Results: ${OUT:-benchmarks/results}/<gpu>-<date>.json,
# <gpu>-<date>-train.json, -train-compiled.json and -cuda-graph.json; tables on stdout.
set -uo pipefail  # not -e: one failing step must not cost the others (the device time is spent once)
export PYTHONPATH=src
out=${OUT:-benchmarks/results}
mkdir -p "$out"
parts=${*:-layer train compiled graph}
for part in $parts; do
    case $part in layer | train | compiled | graph) ;; *) echo "gpu_session: unknown part '$part'" >&2; exit 2 ;; esac
done
status=0
step() {
    echo "+ $*" >&2
    "$@" || { echo "gpu_session: FAILED (exit $?): $*" >&2; status=1; }
}
name=$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")-$(date +%F)
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
for part in $parts; do
    case $part in
    layer) step python -m mhmoe bench layer --device cuda --shapes all --repeats 10 --json "$out/$name.json" ;;
    train) step python -m mhmoe bench train --device cuda --also recompute,triton,triton-recompute --repeats 10 \
        --json "$out/$name-train.json" ;;
    # inductor: about a minute of compilation per variant; the Triton kernels compile as opaque custom ops
    compiled) step python -m mhmoe bench train --device cuda --compile --no-loop --also triton --repeats 10 \
        --json "$out/$name-train-compiled.json" ;;
    # the default path and the Triton kernels, the GPU shapes
    graph) step python -m mhmoe bench layer --device cuda --cuda-graph --json "$out/$name-cuda-graph.json" ;;
    esac
done
exit $status
