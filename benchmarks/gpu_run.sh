#!/usr/bin/env bash
# Every GPU figure issue 17's acceptance reads, in one run of about 9 minutes on one lent
# H100 or H200 (CUDA torch and transformers in the image, no internet). Each arm has its own
# `timeout` and the summary is rewritten after every arm, so a cut run returns what it measured.
#
# Before (on a machine with PyPI): bash benchmarks/gpu_prepare.sh   -> .whl/ and .gpu/ (git-ignored)
# The device tool's call, from the repo root (one call; the budget is 15 device-minutes):
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl", ".gpu"], timeout_s=600)
# It returns, under $OUT (at most 8 files): gpu_results.json (all figures and raw results),
# gpu_results.md (the acceptance table and the profile), step_2048.json, step_4096.json, log.txt.
#
# Dry run on a CPU (every arm at toy sizes, a few minutes; no wheels installed):
#   DEVICE=cpu OUT=/tmp/gpu_dry PY=/work/main/.venv/bin/python bash benchmarks/gpu_run.sh
#
# Arms (what the acceptance reads):
#   lm_smol       LM forward to model.layers.6 alone, SmolLM2-135M architecture, random
#                 weights, 256 rows, bf16 (the ceiling)
#   run_default   default BatchTopK end to end, bf16, batch_rows 256, buffer 524288
#                 -> tokens/s and share of the ceiling
#   sparsify      sparsify's Trainer.fit() end to end, same model (truncated after layer 6),
#                 same rows, TopK k=32, 4608 latents, 32 x 128 per step
#   group8 / run_one   hydra/launcher=grouped architecture=topk,batchtopk sae.k=16,32,64,128
#                 vs one run of the same size -> SAE tokens/s ratio
#   profile       torch.profiler over 64 steady steps of the default run -> device-busy share
#   step_2048 / step_4096   bench_step: the SAE step alone at d_in 2048 x d_sae 16384 and
#                 4096 x 65536, k 32, 4096 tokens, bf16, eager and compiled, and the peers
#   run_compiled  the default run with training.compile=true (CUDA graphs)
#   run_1b_compiled / feed_auto   the 1B run compiled; run_one's size with buffer.size_tokens=auto
#   lm_1b / run_1b / group8_1b   the 1.07B random-weight Llama (hidden 2048, 16 layers,
#                 SmolLM2 tokenizer, hf backend, hook model.layers.8, d_sae 16384, 64 rows)
set -uo pipefail
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu_out}
W=${WORK:-/tmp/gpu_work}  # arms' own files; only the summary goes to $OUT
rm -rf "$W" && mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HYDRA_FULL_ERROR=1
exec > >(tee "$OUT/log.txt") 2>&1
START=$(date +%s)
stamp() { echo "=== $1 ($(( $(date +%s) - START )) s)"; }
# The arms' own limits sum to more than one call's 600 s, so that a fast arm's spare time
# goes to the next; this deadline keeps the last arm from being killed by the device tool
# mid-write. cap N prints N or the seconds left before the deadline, whichever is smaller
# (at least 1: past the deadline each arm costs about a second, and writes no summary).
DEADLINE=${DEADLINE:-570}
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
cap() { local left; left=$(left); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }

if [ "$DEVICE" = cuda ]; then
  PY=${PY:-python3}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site:$PWD/.gpu/site"
  MODE=full
  # Sizes: tokens per arm, chosen so that the whole script fits one 600 s call.
  T_LM=2000000 T_RUN=6000000 T_ONE=2000000 T_GROUP=2000000 T_SPARSIFY=4000000 T_COMPILED=4000000
  T_LM1B=500000 T_RUN1B=2000000 T_GROUP1B=1000000 SKIP=40 WINDOW=64 T_PROFILE=1000000
  STEP_ARGS="--steps 20 --warmup 5 --repeats 3"
  SMOL_ROWS=256 ROWS1B=64 BUFFER=524288 SMALL=()
else
  PY=${PY:-python}
  export PYTHONPATH="$PWD"
  MODE=tiny
  T_LM=16384 T_RUN=16384 T_ONE=8192 T_GROUP=8192 T_SPARSIFY=8192 T_COMPILED=12288
  T_LM1B=8192 T_RUN1B=8192 T_GROUP1B=8192 SKIP=2 WINDOW=2 T_PROFILE=24576
  STEP_ARGS="--steps 2 --warmup 2 --repeats 1 --batch 256"
  SMOL_ROWS=16 ROWS1B=16 BUFFER=16384 SMALL=()
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for m in hydra datasets sae_lens sparsify; do $PY -c "import $m" 2>&1 | tail -1 | sed "s/^/import $m: /"; done
summary() {  # summary [final]: gpu_results.{json,md} from every arm's files so far
  [ "${1:-}" = final ] || [ "$(left)" -gt 0 ] || return 0
  $PY benchmarks/gpu_arms.py summary --work "$W" --out "$OUT" \
    --meta "{\"device\": \"$($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')\", \"mode\": \"$MODE\", \"commit\": \"$(git rev-parse --short HEAD 2>/dev/null)\"}" >/dev/null
}

stamp models
TINY=$([ "$MODE" = tiny ] && echo --tiny)
timeout $(cap 120) $PY benchmarks/gpu_arms.py models --config .gpu/smollm2 --out "$W" $TINY
SMOL="model=smollm2-135m-hf model.source=pretrained model.name=$W/smol"
LLAMA="model=smollm2-135m-hf model.source=pretrained model.name=$W/llama1b model.hook_point=model.layers.8"
EVAL="eval.rows=64 eval.ce_rows=8 training.device=$DEVICE"
COMMON="training.autocast=bf16 $EVAL ${SMALL[*]}"
train() {  # train NAME SECONDS OVERRIDES...: a run into $W/NAME; its tokens/s from eval.json
  local name=$1 limit=$2; shift 2
  stamp "$name"
  timeout "$(cap "$limit")" $PY -m saesweep.train $COMMON "$@" hydra.run.dir="$W/$name" 2>&1 | grep -E "eval:|rror|Traceback|training.compile|stacked" | tail -4
  summary
}
group() {  # group NAME SECONDS OVERRIDES...: the issue's group of 8 into $W/NAME
  local name=$1 limit=$2; shift 2
  stamp "$name"
  timeout "$(cap "$limit")" $PY -m saesweep.train --multirun $COMMON hydra/launcher=grouped architecture=topk,batchtopk sae.k=16,32,64,128 "$@" \
    hydra.sweep.dir="$W/$name" 2>&1 | grep -E "rror|Traceback|stacked|trained on" | tail -4
  summary
}

stamp lm_smol
timeout $(cap 60) $PY benchmarks/bench_lm.py --backend hf --hook model.layers.6 --model-dir "$W/smol" --device "$DEVICE" \
  --batch-rows $SMOL_ROWS --tokens $T_LM --autocast bf16 --out "$W/lm_smol.json" | tail -1
summary
train run_default 90 $SMOL activations.batch_rows=$SMOL_ROWS buffer.size_tokens=$BUFFER training.total_tokens=$T_RUN
stamp sparsify
timeout $(cap 75) $PY benchmarks/gpu_arms.py sparsify --model "$W/smol" --tokens $T_SPARSIFY --out "$W/sparsify.json" 2>&1 | grep -v Warning | tail -3
summary
train run_one 60 $SMOL activations.batch_rows=$SMOL_ROWS buffer.size_tokens=$BUFFER training.total_tokens=$T_ONE
group group8 110 $SMOL activations.batch_rows=$SMOL_ROWS buffer.size_tokens=$BUFFER training.total_tokens=$T_GROUP
stamp profile
timeout $(cap 75) $PY benchmarks/gpu_arms.py profile --out "$W/profile.json" --skip $SKIP --window $WINDOW --run-dir "$W/profile_run" \
  $SMOL training.autocast=bf16 $EVAL ${SMALL[*]} activations.batch_rows=$SMOL_ROWS buffer.size_tokens=$BUFFER \
  training.total_tokens=$T_PROFILE 2>&1 | grep -E "wrote|rror|Traceback" | tail -3
summary

stamp lm_1b
timeout $(cap 50) $PY benchmarks/bench_lm.py --backend hf --hook model.layers.8 --model-dir "$W/llama1b" --device "$DEVICE" \
  --batch-rows $ROWS1B --tokens $T_LM1B --autocast bf16 --out "$W/lm_1b.json" | tail -1
summary
train run_1b 60 $LLAMA sae.expansion_factor=8 activations.batch_rows=$ROWS1B training.total_tokens=$T_RUN1B
group group8_1b 110 $LLAMA sae.expansion_factor=8 activations.batch_rows=$ROWS1B training.total_tokens=$T_GROUP1B


STEP="$PY benchmarks/bench_step.py --device $DEVICE --random --k 32 $STEP_ARGS"
ARMS=saesweep_batchtopk+bf16,saesweep_batchtopk+bf16+compile,saesweep_topk+bf16,saesweep_topk+bf16+compile,sparsify_topk,saelens_batchtopk+bf16
[ "$MODE" = tiny ] && W2048="--d-in 64 --d-sae 512" W4096="--d-in 128 --d-sae 1024" || W2048="--d-in 2048 --d-sae 16384" W4096="--d-in 4096 --d-sae 65536"
stamp step_2048
timeout $(cap 100) $STEP $W2048 --trainers $ARMS --out "$W/step_2048.json" 2>&1 | grep -E "repeat [0-9]|unavailable|rror" | tail -8
stamp step_4096
timeout $(cap 100) $STEP $W4096 --trainers saesweep_batchtopk+bf16,saesweep_batchtopk+bf16+compile,sparsify_topk --out "$W/step_4096.json" \
  2>&1 | grep -E "repeat [0-9]|unavailable|rror" | tail -4
cp "$W"/step_2048.json "$W"/step_4096.json "$OUT"/ 2>/dev/null
summary
train run_compiled 90 $SMOL activations.batch_rows=$SMOL_ROWS buffer.size_tokens=$BUFFER training.total_tokens=$T_COMPILED training.compile=true


# Last, so that a cut run has the figures above: the 1B run compiled, and the default run
# with the buffer sized from the GPU's free memory (buffer.size_tokens=auto).
train run_1b_compiled 60 $LLAMA sae.expansion_factor=8 activations.batch_rows=$ROWS1B training.total_tokens=$T_RUN1B training.compile=true
train feed_auto 60 $SMOL activations.batch_rows=$SMOL_ROWS buffer.size_tokens=auto training.total_tokens=$T_ONE
cp "$W/feed_auto/eval.json" "$W/feed_auto.json" 2>/dev/null

summary final
stamp done
cat "$OUT/gpu_results.md" | head -30
