#!/usr/bin/env bash
# benchmarks/gpu_wheels.sh: download, here, the wheels benchmarks/gpu.sh installs on a lent GPU machine (no network
# there). They go into .whl/ in the repository root, which git ignores through .git/info/exclude (so the device
# tool copies it only when told: carry [".whl"]).
#
# The machine's image has Python 3.12, torch (CUDA), numpy, onnx and onnxruntime with their own dependencies
# (filelock, fsspec, jinja2, networkx, sympy, typing_extensions, protobuf, packaging, …); this is everything else
# fd's builder and fd-bench --compare diffusers import, and DeepCache for its arm: the dependency closure of
# diffusers, transformers, tokenizers, huggingface_hub, safetensors, pillow, tqdm and DeepCache at the versions
# fd is tested with, minus that image. 36 wheels, 42 MB (transformers 13 MB, pillow 7, diffusers 6, hf_xet 4,
# tokenizers 3; measured 2026-12-03): with the 1.5 MB working tree, under the 64 MiB the device tool carries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}

WHEELS=(
    diffusers==0.42.1 transformers==5.24.0 tokenizers==0.23.3 huggingface-hub==2.4.0 safetensors==0.8.0
    pillow==13.0.0 tqdm==4.70.1 regex==2026.11.19 pyyaml==6.0.4 DeepCache==0.1.1
    importlib-metadata==10.2.0 zipp==4.1.2 requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1
    charset-normalizer==3.5.3 idna==3.20 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0
    truststore==0.10.5 hf-xet==1.8.0 typer==0.29.2 click==8.5.1 shellingham==1.5.4 rich==15.0.0
    markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 annotated-doc==0.0.7 lazy-importer==0.1.0
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)

exclude=$(git rev-parse --git-path info/exclude)
grep -qxF "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
du -sh .whl
ls .whl | wc -l
