#!/usr/bin/env bash
# The engine's GPU checks in one go, for a machine with a CUDA GPU and the project importable:
#   bash benchmarks/gpu.sh OUT_DIR
# 1. `csm bench` at the full CSM-1B shapes (random weights, bf16): our CUDA-graph engine and transformers on the
#    same weights in the same run, batch 1/8/32 (nothing else on the GPU while it runs);
# 2. the CUDA tests (graph and compile engines == eager, streaming, parity with transformers on the GPU);
# 3. `csm bench --engine compile` (Inductor-fused steps inside one CUDA graph; compiling takes a few minutes);
# 4. benchmarks/profile_step.py: the compiled frame's kernels, in bf16 and with int8 weight-only linears.
# 5. (only when named) "variants": profile_step.py once per line of $VARIANTS, the engine changes that wait for a
#    GPU (docs/speed.md, "Made since"), then benchmarks/gemv_forms.py; one after another, so that their rows
#    compare.
# 6. (only when named) "serve": benchmarks/bench_serve.py at the full CSM-1B shapes (random weights, 4 s per
#    request): 1, 8 and 32 clients at once through `csm serve`'s continuous batching, against one slot.
# Logs and JSON go to OUT_DIR; each stage has its own time cap, so one failure does not hide the others.
# STAGES="bench tests compile profile" (the default) picks stages; the next GPU session's engine call is
#   STAGES="tests variants serve" bash benchmarks/gpu.sh $OUT    (~10 min)
set -u
stages=" ${STAGES:-bench tests compile profile} "
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
$py -c "import csm" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # a bare GPU machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/gpu.txt"
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
[[ $stages == *" bench "* ]] && timeout "${BENCH_TIMEOUT:-240}" $py -m csm bench --transformers-batches --json "$out/bench_1b_graph.json" \
    2>&1 | tee "$out/bench_1b_graph.log"
[[ $stages == *" tests "* ]] && timeout "${TEST_TIMEOUT:-240}" $py -m pytest -q -x -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/pytest_cuda.log"
[[ $stages == *" compile "* ]] && timeout "${COMPILE_TIMEOUT:-400}" $py -m csm bench --engine compile --no-transformers \
    --json "$out/bench_1b_compile.json" 2>&1 | tee "$out/bench_1b_compile.log"
if [[ $stages == *" profile "* ]]; then
    for q in "" "--quantize int8"; do
        name=profile_compile${q:+_int8}
        timeout "${PROFILE_TIMEOUT:-150}" $py benchmarks/profile_step.py --engine compile $q --json "$out/$name.json" \
            2>&1 | grep -v USDT | tee "$out/$name.log"
    done
fi
if [[ $stages == *" variants "* ]]; then
    variants=${VARIANTS:-"--gemv inductor
--gemv inductor --gemv-chunk 1024
--quantize int8
--quantize int8 --gemv-chunk 1024"}
    i=0
    while IFS= read -r flags; do
        [[ -z $flags ]] && continue
        i=$((i + 1))
        echo "+ variant $i: $flags" | tee -a "$out/variants.txt"
        timeout "${PROFILE_TIMEOUT:-150}" $py benchmarks/profile_step.py --engine compile --profile-frames 3 $flags \
            --json "$out/variant$i.json" 2>&1 | grep -v USDT | tee "$out/variant$i.log" | grep -E "ms/frame|kernels" \
            | tee -a "$out/variants.txt"
    done <<< "$variants"
    timeout "${PROFILE_TIMEOUT:-150}" $py benchmarks/gemv_forms.py --json "$out/gemv_forms.json" 2>&1 \
        | tee "$out/gemv_forms.log"
fi
[[ $stages == *" serve "* ]] && timeout "${SERVE_TIMEOUT:-300}" $py benchmarks/bench_serve.py --preset csm-1b \
    --clients 1,8,32 --slots 32 --max-ms 4000 --json "$out/serve_1b.json" 2>&1 | tee "$out/serve_1b.log"
echo "gpu.sh done"
