#!/usr/bin/env bash
# What issue 7 still owes a GPU, as plans of one device call each: a session has 15 minutes of device time, start
# and transfers included, so one plan per session. Run it with the device tool's `run`, command
# `bash benchmarks/gpu_check.sh PLAN`, timeout_s 600. No wheels are needed (torch, triton, transformers and pytest
# are on the box). In the order to run them:
#
# trained: the end-to-end comparison (goals 3 and 4): a ~100M dLLM-Var model and its autoregressive twin trained
#   for the same steps (2.5 minutes each, with the current objective: tail masks with EOS targets, the document
#   mask, EOS padding), then on 200 held-out prompts each decoder against the twin at batch 1 and 16, FP8 weights,
#   batching at 1-64 concurrent requests, and the LLaDA vanilla / Fast-dLLM baselines last. The JSON is rewritten
#   after every row, so whatever the time limit cuts off, what was measured comes back.
#
# pool (the default): the paged K/V pool and CUDA graphs since the last GPU run:
#   1. the CUDA tests (@pytest.mark.gpu): the paged kernel in bf16, graph replay = eager, greedy decode steps
#      replayed as graphs = decoded eagerly (groups above the largest bucket in chunks), no host sync while
#      decoding, preemption under CUDA graphs (swapped through pinned memory, or rebuilt), a pool sized by
#      gpu_memory_utilization keeping the device within that share, top_p's candidates drawing what ranking the
#      whole vocabulary draws, an FP8 model under graphs decoding what it decodes eagerly;
#   2. the attention launch over a shuffled page table against SDPA on dense keys (LLaDA-8B's heads);
#   3. the graphed DENOISE / COMMIT steps at LLaDA-8B's shape against the HBM roofline, and whole engine steps
#      with the decode step eager and graphed;
#   4. the same K/V pool as slots of max_model_len, paged and reserved, paged on demand with preempted requests
#      swapped or recomputed (a 0.3B model);
#   5. the engine's own cost per step at 1, 64 and 256 concurrent requests (a model too small to hide it), with
#      the decode step eager and graphed, and at 256 (chunks of the 64-row graphs) against no graphs at all.
#
# fp8: FP8 weights at LLaDA-8B's shape: the decode step with compiled blocks in bf16 and in FP8, each against its
#   roofline (FP8 reads 8.0 instead of 15.0 GB of weights per step), and the CUDA tests of the FP8 path; then two
#   short serving measurements on a small random model: priority scheduling's urgent latency and cost
#   (priority_bench) and the first streamed token of whole blocks against settled prefixes (streaming_bench).
#
# Each stage has its own time limit, so a slow one cannot starve the next; logs and JSON go to $OUT.
set -uo pipefail
plan="${1:-pool}"
case "$plan" in trained | pool | fp8) ;; *) echo "unknown plan '$plan': choose trained, pool or fp8" >&2; exit 2 ;; esac
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=. TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under a time limit, its output to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  timeout -k 5 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "=== $name: exit $rc"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "$plan" in
trained)
  stage trained_compare 570 python3 -m benchmarks.trained_compare --minutes 2.5 --lr 1e-3 --vanilla-prompts 8 2 \
    --fast-prompts 24 --fp8-decoders threshold hierarchical --json "$out/trained_compare.json" ;;
pool)
  stage gpu_tests 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_engine.py tests/test_kernels.py \
    tests/test_model.py tests/test_memory.py
  stage attention 55 python3 -m benchmarks.attention_bench --block-m 32 --block-n 128 --splits 4 \
    --merge-in-kernel yes --json "$out/attention_paged.json"
  stage decode_step 140 python3 -m benchmarks.decode_step_bench --variants compiled --json "$out/decode_step_paged.json"
  stage engine_pool 145 python3 -m benchmarks.engine_bench --device cuda --dtype bfloat16 --d-model 1024 --layers 16 \
    --heads 8 --vocab 32000 --num-prompts 64 --batch 64 --prompt-len 128 --max-new-tokens 512 \
    --vanilla-gen-lengths 64 --kv-cache-tokens 16384 --pool-max-model-len 2048 --json "$out/engine_pool.json"
  stage step_overhead 60 python3 -m benchmarks.step_overhead_bench --batches 1 64 256 --steps 24 \
    --json "$out/step_overhead.json" ;;
fp8)
  stage decode_step_fp8 330 python3 -m benchmarks.decode_step_bench --variants compiled fp8 \
    --json "$out/decode_step_fp8.json"
  stage fp8_tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_engine.py -k fp8
  stage priority 60 python3 -m benchmarks.priority_bench --json "$out/priority.json"
  stage streaming 60 python3 -m benchmarks.streaming_bench --json "$out/streaming.json" ;;
esac
