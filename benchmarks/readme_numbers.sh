#!/usr/bin/env bash
# Reruns every benchmark whose numbers README.md quotes, one after another (never two at a time:
# they time side by side and would slow each other), printing the machine and its load first.
#
#   bash benchmarks/readme_numbers.sh [TEACHER_DIR]
#
# TEACHER_DIR: a fine-tuned model for the PTQ benchmark (default runs/quickstart/model, written by
# `python train.py --config configs/quickstart.py --workdir runs/quickstart`); skipped when absent.
set -euo pipefail
cd "$(dirname "$0")/.."
teacher="${1:-runs/quickstart/model}"
echo "machine: $(nproc) cores, $(python3 -c 'import platform; print(platform.processor() or platform.machine())'), python $(python3 -c 'import sys; print(sys.version.split()[0])'), jax $(python3 -c 'import jax; print(jax.__version__)')"
for bench in train_step_vs_torch prune_shrink_latency prune_topk quant_speed; do
  echo; echo "== python benchmarks/${bench}.py   (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
  python3 "benchmarks/${bench}.py"
done
echo; echo "== python benchmarks/ptq_speed.py --teacher_dir ${teacher}   (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
if [ -f "${teacher}/model.safetensors" ]; then
  python3 benchmarks/ptq_speed.py --teacher_dir "${teacher}"
else
  echo "skipped: no fine-tuned teacher in ${teacher}"
fi
echo; echo "== python benchmarks/pretraining_compute.py --steps 400 --finetune_steps 200   (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
python3 benchmarks/pretraining_compute.py --steps 400 --finetune_steps 200
