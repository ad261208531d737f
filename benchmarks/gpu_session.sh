#!/usr/bin/env bash
# The prepared device run for a session with a GPU: benchmarks (every implementation, the Triton kernels
# included, checked against the per-expert reference before it is timed; about 10 minutes on one H200) and the
# `--gpu` reproductions (each part about 5 minutes by `mhmoe reproduce ... --gpu --dry-run`'s FLOPs estimate).
# Run from the repository root on the GPU machine, where nothing is installed: PYTHONPATH=src.
#
#     bash benchmarks/gpu_session.sh [PARTS]
#     PARTS: benchmarks: layer train compiled graph (the default: all four)
#            reproductions: english english-params english-controls english-heads english-all multilingual
#                           multimodal ablations
#
# One call per part fits a per-command time limit while the machine stays warm; `graph` goes last (a failed
# CUDA-graph capture can leave the context unusable). Benchmarks: ${OUT:-benchmarks/results}/<gpu>-<date>.json,
# <gpu>-<date>-train.json, -train-compiled.json and -cuda-graph.json; tables on stdout. Reproductions read the
# data pack from ${DATA:-.gpu-data} (copy ../shared/data there: it is git-ignored, 57 MiB, so the device tool
# can carry it) and write to ${OUT:-benchmarks/results}/reproduce-<task>-<gpu>-<date>/ (parts of one task share
# their folder, so common models are trained once); copy those to results/<task>/ with the hardware and date.
set -uo pipefail  # not -e: one failing step must not cost the others (the device time is spent once)
export PYTHONPATH=src
out=${OUT:-benchmarks/results}
mkdir -p "$out"
data=${DATA:-.gpu-data}
parts=${*:-layer train compiled graph}
for part in $parts; do
    case $part in
    layer | train | compiled | graph | english | english-params | english-controls | english-heads | english-all) ;;
    multilingual | multimodal | ablations) ;;
    *) echo "gpu_session: unknown part '$part'" >&2; exit 2 ;;
    esac
done
status=0
step() {
    echo "+ $*" >&2
    "$@" || { echo "gpu_session: FAILED (exit $?): $*" >&2; status=1; }
}
ood="$data/multilingual/de.test.txt.gz,$data/multilingual/fr.test.txt.gz,$data/multilingual/ru.test.txt.gz"
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
    # the reproductions: parts of a task share one folder; finished runs are reused, not trained again
    # english-all trains nothing new after the other parts: it tabulates every model with the attribution pairs
    english) step python -m mhmoe reproduce english --gpu --part core --data "$data/english" --ood-data "$ood" \
        --no-progress --out "$out/reproduce-english-$name" ;;
    english-params) step python -m mhmoe reproduce english --gpu --part params --data "$data/english" \
        --ood-data "$ood" --no-progress --out "$out/reproduce-english-$name" ;;
    english-controls) step python -m mhmoe reproduce english --gpu --part controls --data "$data/english" \
        --ood-data "$ood" --no-progress --out "$out/reproduce-english-$name" ;;
    english-heads) step python -m mhmoe reproduce english --gpu --part heads --data "$data/english" \
        --ood-data "$ood" --no-progress --out "$out/reproduce-english-$name" ;;
    english-all) step python -m mhmoe reproduce english --gpu --part all --data "$data/english" \
        --ood-data "$ood" --no-progress --out "$out/reproduce-english-$name" ;;
    multilingual) step python -m mhmoe reproduce multilingual --gpu --part core --data "$data/multilingual" \
        --no-progress --out "$out/reproduce-multilingual-$name" ;;
    multimodal) step python -m mhmoe reproduce multimodal --gpu --part core --data "$data" \
        --no-progress --out "$out/reproduce-multimodal-$name" ;;
    ablations) step python -m mhmoe reproduce ablations --gpu --sweeps heads --data "$data/english" \
        --no-progress --out "$out/reproduce-ablations-$name" ;;
    esac
done
exit $status
