#!/usr/bin/env bash
# Wall time of the quick report (what `make report` runs, into a scratch folder).
#     benchmarks/report_time.sh [OUT]       (default OUT: /tmp/rqlab-report-bench)
# Prints the machine, the command and the minutes it took; the report's own exit
# status is passed on.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/rqlab-report-bench}"
echo "# $(date -u '+%Y-%m-%d %H:%M UTC') | nproc $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') | load average $(cut -d' ' -f1 /proc/loadavg)"
echo "# command: .venv/bin/rqlab report --profile quick --out $OUT"
start=$(date +%s.%N)
.venv/bin/rqlab report --profile quick --out "$OUT"
status=$?
end=$(date +%s.%N)
python3 -c "import sys; s = float(sys.argv[2]) - float(sys.argv[1]); print(f'report wall time: {s / 60:.2f} min ({s:.0f} s), exit status {sys.argv[3]}')" "$start" "$end" "$status"
exit $status
