#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py) on a bare CUDA machine with no package index.
#   bash scripts/gpu_check.sh [--phases preflight,ar,ratios,sd,stream] [--out PATH]   # on the GPU
#   bash scripts/gpu_check.sh --smoke                               # on the CPU, tiny shapes (CI)
# The SmolLM2 weights may come as parts of the GGUF, made with
#   split -n 2 SmolLM2-135M-Instruct.Q4_1.gguf checkpoints/gguf-parts/SmolLM2-135M-Instruct.Q4_1.gguf.part-
# Once the joined parts match the pinned SHA-256 they are converted; until then the phases that
# need no real weights (ar, ratios) still run. Wheels in checkpoints/wheels/ (the gguf package, which
# the converter needs) are installed first where no package index is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if compgen -G "checkpoints/wheels/*.whl" >/dev/null; then
  python -m pip install -q --no-index --no-deps --target /tmp/gpu-check-site checkpoints/wheels/*.whl
  export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
ckpt=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
gguf=$ckpt/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$ckpt/model.pth" ] && compgen -G "checkpoints/gguf-parts/*.part-*" >/dev/null; then
  mkdir -p "$ckpt"
  cat checkpoints/gguf-parts/*.part-* > "$gguf.joined"
  want=$(cd scripts && python -c "import prepare_smollm2; print(prepare_smollm2.GGUF_SHA256)")
  if [ "$(sha256sum "$gguf.joined" | cut -d' ' -f1)" = "$want" ]; then
    mv "$gguf.joined" "$gguf"
    python scripts/prepare_smollm2.py
  else
    rm "$gguf.joined"
    echo "the GGUF parts in checkpoints/gguf-parts are not complete yet: phases with real weights are skipped"
  fi
fi
exec python -m benchmarks.gpu_check "$@"
