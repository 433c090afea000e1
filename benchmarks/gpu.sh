#!/usr/bin/env bash
# The spectrum, synthesis, attribution and scale benchmarks on one CUDA GPU, in under 10 minutes;
# JSON results and a RESULTS.md section (gpu-section.md, absolute figures) in $OUT (default
# benchmarks/gpu-results). Needs jax with CUDA, flax, optax, orbax, scikit-learn and tqdm
# there (torch with CUDA for the PyTorch peers, skipped with a note when absent); the
# package runs from this checkout (PYTHONPATH), uninstalled.
#   bash benchmarks/gpu.sh             # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run   # the same commands on the CPU with tiny sizes (~2 min)
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
out=${OUT:-benchmarks/gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "$dry" = 1 ]; then
  export JAX_PLATFORMS=cpu
  models=mlp-3x50 conv=lenet1 inputs=2048 batches=512 repeats=1 torch=cpu limit=120
else
  models=mlp-3x50,mlp-8x20,lenet5,cifar-convnet conv=lenet5 inputs=60000 batches=1024,4096
  repeats=5 torch=cuda limit=240
  python3 -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()"
fi
python3 -c "import jax; print(jax.devices())" | tee "$out/devices.txt"
timeout "$limit" python3 benchmarks/spectrum.py --models "$models" --batch-sizes "$batches" \
  --inputs "$inputs" --repeats "$repeats" --original-sizes '' --torch-device "$torch" \
  --json > "$out/spectrum.json"
timeout 120 python3 benchmarks/synthesis.py --models "mlp-3x50,$conv" \
  --inputs "$((inputs < 8192 ? inputs : 8192))" --original-inputs 5 --eager-inputs 5 \
  --repeats "$repeats" --json > "$out/synthesis.json"
timeout 120 python3 benchmarks/attribution.py --models "mlp-3x50,$conv" --inputs "$inputs" \
  --repeats "$repeats" --ablation-inputs 512 --json > "$out/attribution.json"
if [ "$dry" = 1 ]; then
  scale=(--model resnet20 --classes 10,100 --inputs 64 --batch-size 32 --repeats 1 --rows 2000,5000
         --stream-repeats 1)
else
  scale=(--model resnet18 --classes 10,100,1000 --inputs 8192 --batch-size 512 --repeats 3
         --rows 10000,100000)
fi
timeout 120 python3 benchmarks/scale.py --parts classes,stream "${scale[@]}" --json \
  > "$out/scale.json"
python3 benchmarks/gpu_section.py "$out" > "$out/gpu-section.md"
echo "results in $out; paste $out/gpu-section.md into benchmarks/RESULTS.md"
