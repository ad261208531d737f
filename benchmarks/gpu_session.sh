#!/usr/bin/env bash
# The prepared device run for a session with a GPU. It begins with the decisive English part (dense, fine-grained
# SMoE and MH-MoE, 5 seeds, >= 8 M tokens per model, sized on the device to end within --budget-min 8 minutes);
# the other parts are for later calls. Run from the repository root on the GPU machine (nothing installed there:
# PYTHONPATH=src, python3):
#
#     bash benchmarks/gpu_session.sh [PARTS]            (default: decisive)
#     PARTS: decisive english english-params english-controls english-heads english-all english-v2 (v2's Table 1)
#            multilingual multimodal ablations (the heads sweep, H = 1..12 at D = 384), and the benchmarks layer
#            train compiled graph
#
# One call per part fits the 10-minute command limit while the machine stays warm; `graph` goes last (a failed
# CUDA-graph capture can leave the context unusable). Every reproduction starts with its smoke and rate step and
# sizes its steps to end within --budget-min (8). Runs train in local scratch, ${SCRATCH:-/tmp/mhmoe-scratch}
# (checkpoints deleted once a run is analysed; each part checks its own free disk); what comes back lies in
# ${OUT:-benchmarks/results}: at most 8 files of <= 16 MiB, at most 2 folders down. An English part sends, after
# every seed round, OUT/english-PART/ results.json, results.md, runs.tar.gz (every run's config, summary, metrics,
# record) and val_curves.png; the other reproductions their results.json and results.md; each benchmark one JSON.
# A rerun into the same scratch (the machine still warm) continues a stopped part from its finished runs.
# Data: ${DATA:-.gpu-data} (copy ../shared/data there: git-ignored, 57 MiB, so the device tool can carry it).
# Tests: DEVICE=cpu runs the same steps on the CPU; EXTRA adds arguments to every reproduction (a tiny plan).
set -uo pipefail  # not -e: one failing step must not cost the others (the device time is spent once)
export PYTHONPATH=src
out=${OUT:-benchmarks/results}
scratch=${SCRATCH:-/tmp/mhmoe-scratch}
data=${DATA:-.gpu-data}
device=${DEVICE:-cuda}
extra=${EXTRA:-}
parts=${*:-decisive}
max_files=8
for part in $parts; do
    case $part in
    decisive | english | english-params | english-controls | english-heads | english-all | english-v2) ;;
    multilingual | multimodal | ablations | layer | train | compiled | graph) ;;
    *) echo "gpu_session: unknown part '$part'" >&2; exit 2 ;;
    esac
done
mkdir -p "$out" "$scratch"
status=0
step() {
    echo "+ $*" >&2
    "$@" || { echo "gpu_session: FAILED (exit $?): $*" >&2; status=1; }
}
files_out() { find "$out" -type f | wc -l; }
# free_gib N: the scratch file system has N GiB free, else the part is skipped with the reason
free_gib() {
    local free
    free=$(df -Pk "$scratch" | awk 'NR == 2 {print int($4 / 1048576)}')
    [ "$free" -ge "$1" ] || { echo "gpu_session: $scratch has $free GiB free, the part needs $1: skipped" >&2; return 1; }
}
# keep DIR NAME: copy the results of a reproduction without --export into OUT/NAME/, within the file limit
keep() {
    mkdir -p "$out/$2"
    for f in results.json results.md; do
        if [ "$(files_out)" -ge $max_files ]; then echo "gpu_session: $max_files files in $out: $f not kept" >&2; continue; fi
        [ -f "$1/$f" ] && cp "$1/$f" "$out/$2/$f"
    done
}
name=$(python3 -c "from mhmoe.experiments.plan import device_model; print(device_model())")-$(date +%F)
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
df -h "$scratch" | tail -1
english() {  # english PART: the seed-major driver, exported into OUT/english-PART/ after every round
    free_gib 4 || { status=1; return; }
    local folder="$scratch/reproduce-english-$name"  # the parts of one budget share their runs
    [ "$1" = decisive ] && folder="$scratch/reproduce-english-decisive-$name"  # its own, longer budget
    # shellcheck disable=SC2086  # EXTRA is a list of arguments
    step python3 -m mhmoe reproduce english --gpu --part "$1" --device "$device" --data "$data/english" \
        --no-progress --out "$folder" --export "$out" $extra
}
for part in $parts; do
    if [ "$(files_out)" -ge $max_files ]; then
        echo "gpu_session: $max_files files already in $out: part $part skipped" >&2; status=1; continue
    fi
    case $part in
    decisive) english decisive ;;
    english) english core ;;
    english-params | english-controls | english-heads | english-all | english-v2) english "${part#english-}" ;;
    # each starts with the smoke and rate step and sizes its steps to --budget-min (8), or refuses with the reason
    # shellcheck disable=SC2086
    multilingual) free_gib 4 && step python3 -m mhmoe reproduce multilingual --gpu --part core --device "$device" \
        --no-progress --data "$data/multilingual" --out "$scratch/reproduce-multilingual-$name" $extra
        keep "$scratch/reproduce-multilingual-$name" multilingual ;;
    # shellcheck disable=SC2086
    multimodal) free_gib 4 && step python3 -m mhmoe reproduce multimodal --gpu --part core --device "$device" \
        --no-progress --data "$data" --out "$scratch/reproduce-multimodal-$name" $extra
        keep "$scratch/reproduce-multimodal-$name" multimodal ;;
    # shellcheck disable=SC2086
    ablations) free_gib 4 && step python3 -m mhmoe reproduce ablations --gpu --sweeps heads --device "$device" \
        --no-progress --data "$data/english" --out "$scratch/reproduce-ablations-$name" $extra
        keep "$scratch/reproduce-ablations-$name" ablations ;;
    layer) step python3 -m mhmoe bench layer --device cuda --shapes all --repeats 10 --json "$out/$name.json" ;;
    train) step python3 -m mhmoe bench train --device cuda --also recompute,triton,triton-recompute --repeats 10 \
        --json "$out/$name-train.json" ;;
    # inductor: about a minute of compilation per variant; the Triton kernels compile as opaque custom ops
    compiled) step python3 -m mhmoe bench train --device cuda --compile --no-loop --also triton --repeats 10 \
        --json "$out/$name-train-compiled.json" ;;
    # the default path and the Triton kernels, the GPU shapes
    graph) step python3 -m mhmoe bench layer --device cuda --cuda-graph --json "$out/$name-cuda-graph.json" ;;
    esac
done
find "$out" -type f -printf '%s %P\n' | sort -k2 >&2
exit $status
