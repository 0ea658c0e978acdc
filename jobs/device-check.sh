#!/usr/bin/env bash
# The GPU check of issue 13, for a machine with a CUDA GPU (written for one H200, 16 cores,
# Open MPI 4.1.6 with the cuda extension); under 8 minutes there by design, not yet by
# measurement: it has NOT run on a GPU (no GPU machine was lent to the issue's session).
#
#   bash jobs/device-check.sh                  # results under ./device-check/ (OUT=dir to change)
#
# Steps (each prints its result; the script stops at the first failure, exit status 1):
#   1. torch sees a CUDA device, else one line and exit 1 (nothing is skipped silently);
#   2. mpirun -n 2 python -m mpips.doctor --cuda-probe: the CUDA-aware report and a Send/Recv of
#      a device buffer between two ranks;
#   3. the default job on --device cuda (4 ranks: 1 server, 1 data server, 2 GPU workers);
#   4. bsp on GPU against CPU after 20 steps, float32: relative difference <= 1e-5;
#   5. pull bandwidth into device memory (staging, and direct where CUDA-aware) against a raw copy;
#   6. samples/s of mpips (1 GPU worker, CPU servers) against a plain single-GPU torch loop for a
#      bf16 ByteGPT of ~76 M parameters (6 layers, width 1024, context 256).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$here/jobs/env.sh"
out=${OUT:-device-check}

if ! seen=$(python -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>&1) \
        || [ "${seen##* }" != "True" ]; then
    echo "device-check: FAILED: no CUDA device visible to torch (${seen//$'\n'/ }); run it on a GPU machine" >&2
    exit 1
fi
mkdir -p "$out"
mpirun=$(python -m mpips.doctor --launcher || echo mpirun)
run() { timeout "$1" "${@:2}"; }
step() { echo; echo "== $*"; }

step "1. GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

step "2. doctor with the device-buffer probe"
run 120 "$mpirun" -n 2 python -m mpips.doctor --busy 0.5 --cuda-probe | tee "$out/doctor.txt"
grep -q "CUDA Send/Recv  *passed" "$out/doctor.txt" || echo "(the probe did not pass: GPU workers stage through host memory)"

step "3. the default job on --device cuda"
run 240 "$mpirun" -n 4 python -m mpips.train --device cuda --steps 230 | tee "$out/default-cuda.txt"
grep -E "device buffers|held-out accuracy" "$out/default-cuda.txt"

step "4. bsp, 20 steps, float32: GPU against CPU"
common=(--steps 20 --data-servers 0 --sync bsp --no-final-eval)
run 120 "$mpirun" -n 3 python -m mpips.train "${common[@]}" --device cuda --save "$out/gpu20.pt" >"$out/gpu20.txt"
run 120 "$mpirun" -n 3 python -m mpips.train "${common[@]}" --device cpu --save "$out/cpu20.pt" >"$out/cpu20.txt"
python -m mpips.bench.gpu compare "$out/gpu20.pt" "$out/cpu20.pt" --rtol 1e-5 | tee "$out/compare.json"

step "5. pull bandwidth into device memory"
run 120 "$mpirun" -n 2 python -m mpips.bench.gpu pull --mib 256 | tee "$out/pull.json"

step "6. throughput: mpips (1 GPU worker, CPU servers) against a plain single-GPU loop, bf16 GPT"
gpt=(--gpt-layers 6 --gpt-width 1024 --gpt-heads 16 --gpt-context 256 --batch-size 16)
run 150 python -m mpips.bench.gpu loop "${gpt[@]}" --steps 40 --warmup 5 | tee "$out/loop.json"
# 1 worker + 4 servers with 3 torch threads each on 16 cores; asp lets the GPU step ahead of the
# servers' Adam (bsp waits for it every step)
for sync in bsp asp; do
    run 150 "$mpirun" -n 5 python -m mpips.train --model gpt --dataset pytext "${gpt[@]}" --device cuda \
        --precision bf16 --servers 4 --data-servers 0 --threads 3 --sync "$sync" --steps 45 --no-final-eval \
        --optimizer adamw --lr 3e-4 | tee "$out/mpips-$sync.txt"
done
grep -h "samples/s (all workers)" "$out"/mpips-*.txt

echo
echo "device-check: done; results in $out/ (put them in the README's GPU section, labelled with this machine)"
