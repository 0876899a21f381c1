#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the wheels that scripts/pretrain-gpu.sh and scripts/gpu-check.sh
# install on the GPU
# machine, whose python3 is 3.12 and has CUDA torch, numpy, tokenizers, safetensors, huggingface_hub,
# typer, pyyaml and tqdm but an older transformers, no pydantic and no tomli-w.
# usage: scripts/gpu-wheels.sh [DIR]   (default build/gpu-wheels, git-ignored; carry it with the run)
set -euo pipefail
dir=${1:-build/gpu-wheels}
pip=${PIP:-.venv/bin/pip}
[ -x "$pip" ] || pip="python3 -m pip"
mkdir -p "$dir"
# --no-deps: exactly these, so pip never touches the machine's torch; versions = this project's venv
$pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" transformers==5.24.0 tokenizers==0.23.3 regex==2026.11.19 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
    tomli-w==1.2.0 peft==0.21.2 bitsandbytes==0.50.2  # peft: FLEx's LoRA; bitsandbytes: nf4 experts
du -sh "$dir"
