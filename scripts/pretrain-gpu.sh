#!/usr/bin/env bash
# Pretrain a base on one CUDA GPU as ONE command of the device machine, then measure it, write its
# card, and pack the model directory into $OUT (files back are at most 16 MiB each, so the directory
# travels as a tar split into parts). Run from the repository root, with the wheels of
# scripts/gpu-wheels.sh carried (run tool: carry ["build/gpu-wheels"]):
#     scripts/pretrain-gpu.sh [CONFIG]          (default configs/pretrain-tiny-v2.toml)
# Training stops at a step boundary after MAX_MINUTES (default 7) and leaves a checkpoint in
# RUN_DIR; running the script again on the same (still warm) machine resumes it.
# SET="key=value key=value" adds config overrides (no spaces inside one).
# Back here: cat PARTS... | tar -x -C DEST   (SHA256SUMS lists each part's checksum).
set -euo pipefail
config=${1:-configs/pretrain-tiny-v2.toml}
wheels=${WHEELS:-build/gpu-wheels}
run_dir=${RUN_DIR:-runs/pretrain-gpu}
out=${OUT:-runs/pretrain-gpu-out}
python=${PYTHON:-python3}
mkdir -p "$out" "$run_dir"

if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    # --target + PYTHONPATH: these shadow the image's versions without pip touching its torch
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/flexmoe-site "$wheels"/*.whl
    export PYTHONPATH=/tmp/flexmoe-site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
flexmoe() { "$python" -c 'import sys; from flexmoe.cli import main; sys.exit(main())' "$@"; }
"$python" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "transformers", transformers.__version__)'

overrides=()
for item in ${SET:-}; do overrides+=(--set "$item"); done
resume=()
[ -f "$run_dir/checkpoint.pt" ] && resume=(--resume)
flexmoe pretrain --config "$config" --output "$run_dir" "${resume[@]}" --max-minutes "${MAX_MINUTES:-7}" \
    --no-eval "${overrides[@]}" 2>&1 | tee -a "$out/pretrain.log"
if [ -f "$run_dir/checkpoint.pt" ]; then
    echo "paused at the time limit: run this script again on the same machine to resume" | tee -a "$out/pretrain.log"
    exit 3
fi
flexmoe pretrain --config "$config" --output "$run_dir" --eval-only "${overrides[@]}" 2>&1 | tee -a "$out/pretrain.log"
files=(config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json README.md
       evaluation.json pretrain-config.toml train_log.jsonl training_summary.json)
tar -C "$run_dir" -cf - "${files[@]}" | split -b 15M -d - "$out/model.tar.part-"
(cd "$out" && sha256sum model.tar.part-* > SHA256SUMS && ls -la)
