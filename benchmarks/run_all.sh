#!/usr/bin/env bash
# Every CPU benchmark of docs/performance.md, one after the other, each also writing
# its figures to benchmarks/results/<name>.json.   benchmarks/run_all.sh [extra args]
# Takes about an hour on 2 idle cores. Run it on an otherwise idle machine: other
# processes on the cores make every figure noisy (the scripts print the load average).
# The GPU variant runs only where CUDA is available; the report timing is separate
# (benchmarks/report_time.sh), as it takes much longer.
set -eu
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RES=benchmarks/results
mkdir -p "$RES"
$PY benchmarks/attack_throughput.py --json "$RES/attack_throughput.json" "$@"
$PY benchmarks/eval_throughput.py --json "$RES/eval_throughput.json" "$@"
$PY benchmarks/attack_strength.py --json "$RES/attack_strength.json" "$@"
$PY benchmarks/quant_overhead.py --json "$RES/quant_overhead.json" "$@"
$PY benchmarks/transfer_eot.py --json "$RES/transfer_eot.json" "$@"
$PY benchmarks/training_cost.py --json "$RES/training_cost.json" "$@"
if $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    $PY benchmarks/attack_throughput.py --device cuda --json "$RES/attack_throughput_cuda.json" "$@"
else
    echo "# no CUDA GPU here: skipping benchmarks/attack_throughput.py --device cuda"
fi
