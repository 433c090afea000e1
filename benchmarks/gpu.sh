#!/usr/bin/env bash
# The benchmarks on a CUDA machine, in under 8 minutes; JSON results in $OUT (or
# benchmarks/gpu-results). Needs jax with CUDA, flax, optax, orbax, scikit-learn, tqdm and
# torch there; the package runs from this checkout (PYTHONPATH), uninstalled.
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import jax, torch; print(jax.devices(), torch.cuda.is_available())" | tee "$out/devices.txt"
timeout 300 python3 benchmarks/spectrum.py --models mlp-3x50,mlp-8x20,lenet5,cifar-convnet \
  --batch-sizes 1024,4096 --inputs 60000 --repeats 5 --original-sizes '' --torch-device cuda \
  --json > "$out/spectrum.json"
timeout 150 python3 benchmarks/synthesis.py --models mlp-3x50,lenet5 --inputs 8192 \
  --original-inputs 10 --repeats 3 --json > "$out/synthesis.json"
timeout 90 python3 benchmarks/attribution.py --models mlp-3x50,lenet5 --inputs 60000 --repeats 3 \
  --ablation-inputs 2000 --json > "$out/attribution.json"
echo "results in $out"
