#!/bin/bash
# The long background work of the zoo (issues 13 and 14), one torch thread each, niced,
# resumable, logging under runs/ (local, ignored by git):
#   - the training queue (scripts/zoo_queue.py), two workers: the full-budget zoo, each worker
#     one model at a time (a model's lock keeps it to one worker), each model committed alone
#     once it passes its checks;
#   - the measuring queue (scripts/measure_queue.py): the standard protocol's cards (500
#     examples, 1,000 for full-budget adversarial models) of every built model not yet
#     measured, the claims' models first, then again every 10 minutes, so that models the
#     training queue finishes get theirs; after each model scripts/commit_measured.py
#     commits every measured card that passes zoo.standard_problems (one commit per model;
#     a failing one is left, its reasons logged). MEASURERS=2: two workers (a model's lock
#     keeps it to one), for when nothing trains;
#   - findings (b) under the standard protocol (`scripts/findings.py --section B --n 500`,
#     once: it resumes from its finished batches and writes docs/findings/b_standard.json);
#   - report: the findings profile's report (`rqlab report --profile findings --out
#     reports/findings-next`, one thread); hours, so it is resumed across sessions: a rerun
#     keeps the runs that finished while rqlab's source is the same (rqlab/report/reuse.py),
#     and `checkpoint` commits the finished runs' folders there. Notebook 05 (the longest run)
#     runs first, then the rest (REPORT_FIRST=RUN picks another). reports/findings stays the
#     last complete report (docs/findings.md is generated from it and tests/test_findings_page.py
#     holds the two together) until `publish` replaces it with a complete findings-next.
#
#   scripts/background.sh            start the queue and the loop (a job already running is
#                                    left alone); NO_COMMIT=1 before it: commit nothing;
#                                    WORKERS=1 before it: one training worker, not two;
#                                    MEASURERS=2: two measuring workers, not one
#   scripts/background.sh start JOB...  start only those of: train, measure, findings, report
#   scripts/background.sh status     what runs, and the last lines of each log
#   scripts/background.sh pause      SIGSTOP both (e.g. while the test suite runs: it is
#   scripts/background.sh resume     several times slower on a loaded machine), SIGCONT; the
#                                    epoch in progress then counts the pause in its card's
#                                    epoch_time_s, so prefer stop and start (a training run
#                                    resumes at its last finished epoch) where times matter
#   scripts/background.sh stop       end both (their progress is kept: start resumes)
#   scripts/background.sh publish    once reports/findings-next is complete (every run ok,
#                                    every claim judged): it becomes reports/findings, its index
#                                    is rewritten there (every run reused), docs/findings.md is
#                                    regenerated, and all of it is committed
#   scripts/background.sh checkpoint after stop, at a session's end: commit what the stopped
#                                    measuring finished (commit_measured.py), the unfinished
#                                    measurements' progress files (ignored by git otherwise),
#                                    so that a fresh checkout's measuring loop resumes them
#                                    (commit_measured.py commits their removal with the
#                                    record), and the findings report's finished runs
set -u
cd "$(dirname "$0")/.." || exit 1
QUEUE="scripts/zoo_queue.py"
MEASURE="scripts/measure_queue.py"
LOOP="rqlab-measure-loop"   # the measuring loop of older checkouts (a shell loop of rqlab zoo measure)

pids() { pgrep -f "$1"; }
FINDINGS="scripts/findings.py --section B"
REPORT_OUT="reports/findings-next"   # the batch in progress (committed at a stop, resumed after)
PUBLISHED="reports/findings"          # the finished report that docs/findings.md is generated from
REPORT="rqlab report --profile findings --out $REPORT_OUT"
all_pids() { { pids "$QUEUE"; pids "$MEASURE"; pids "$LOOP"; pids "rqlab zoo measure"; pids "$FINDINGS"; pids "$REPORT"; } | sort -u; }

case "${1:-start}" in
  start)
    [ -x .venv/bin/python ] || { echo "no .venv: run make setup first" >&2; exit 2; }
    shift
    jobs=" ${*:-train measure} "
    for j in $jobs; do
      case "$j" in train|measure|findings|report) ;; *) echo "unknown job $j: choose train, measure, findings or report" >&2; exit 2;; esac
    done
    mkdir -p runs/measure
    export OMP_NUM_THREADS=1
    # launch JOB PATTERN LABEL LOG CMD...: start CMD unless JOB was not asked for or PATTERN runs
    launch() {
      local job=$1 pattern=$2 label=$3 log=$4; shift 4
      [[ "$jobs" == *" $job "* ]] || return 0
      if [ -n "$(pids "$pattern")" ]; then echo "$label already running"; return 0; fi
      setsid nohup "$@" >> "$log" 2>&1 < /dev/null &
      echo "$label started: $log"
    }
    # two training workers, one per core (each model is trained by one of them: its lock);
    # the measuring loop shares the cores when it has a model to measure
    # NO_COMMIT=1: train and measure, commit nothing (e.g. after the last CI check of a
    # session: a later start commits what passed its checks)
    nocommit=""
    if [ -n "${NO_COMMIT:-}" ]; then nocommit="--no-commit"; fi
    launch train "$QUEUE --threads 1 --worker 1" "training queue (worker 1)" runs/zoo_queue.log \
      nice -n 5 .venv/bin/python "$QUEUE" --threads 1 --worker 1 $nocommit
    # WORKERS=1: one training worker, leaving a core to the measuring loop (whose standard
    # protocol otherwise halves both workers' speed: three processes on two cores)
    if [ "${WORKERS:-2}" != 1 ]; then
      launch train "$QUEUE --threads 1 --worker 2" "training queue (worker 2)" runs/zoo_queue2.log \
        nice -n 5 .venv/bin/python "$QUEUE" --threads 1 --worker 2 $nocommit
    fi
    launch measure "$MEASURE --threads 1 --worker 1" "measuring queue (worker 1)" runs/measure/queue.log \
      nice -n 5 .venv/bin/python "$MEASURE" --threads 1 --worker 1 --loop $nocommit
    if [ "${MEASURERS:-1}" = 2 ]; then
      launch measure "$MEASURE --threads 1 --worker 2" "measuring queue (worker 2)" runs/measure/queue2.log \
        nice -n 5 .venv/bin/python "$MEASURE" --threads 1 --worker 2 --loop $nocommit
    fi
    launch findings "$FINDINGS" "findings (b)" runs/findings_B.log \
      nice -n 5 .venv/bin/python $FINDINGS --n 500
    # notebook 05 first, on its own (--only keeps the other runs): its AutoAttack "rand" makes
    # it the longest run by far (1-2 h on one thread), and a run cut by a session's stop
    # restarts from nothing, so it gets a session's whole time; then the whole profile, which
    # keeps 05 (reuse) and every other finished run
    # shellcheck disable=SC2086  (REPORT is words)
    launch report "$REPORT" "findings report" runs/findings_report.log \
      nice -n 5 bash -c ".venv/bin/$REPORT --only ${REPORT_FIRST:-05_double_win_quant}; .venv/bin/$REPORT"
    ;;
  status)
    for p in $(all_pids); do ps -o pid=,stat=,etime=,args= -p "$p" | cut -c1-150; done
    echo "--- runs/zoo_queue.log";        tail -n 3 runs/zoo_queue.log 2>/dev/null
    echo "--- runs/zoo_queue2.log";       tail -n 3 runs/zoo_queue2.log 2>/dev/null
    echo "--- runs/measure/queue.log";    tail -n 3 runs/measure/queue.log 2>/dev/null
    echo "--- runs/measure/queue2.log";   tail -n 3 runs/measure/queue2.log 2>/dev/null
    echo "--- runs/findings_B.log";       tail -n 3 runs/findings_B.log 2>/dev/null
    echo "--- runs/findings_report.log";  tail -n 3 runs/findings_report.log 2>/dev/null
    ;;
  pause)  for p in $(all_pids); do kill -STOP "$p"; done; echo "paused: $(all_pids | xargs)";;
  resume) for p in $(all_pids); do kill -CONT "$p"; done; echo "resumed: $(all_pids | xargs)";;
  stop)   for p in $(all_pids); do kill -CONT "$p"; kill -TERM "$p"; done; echo "stopped";;
  checkpoint)
    if [ -n "$(all_pids)" ]; then echo "jobs still run: scripts/background.sh stop first" >&2; exit 2; fi
    # entries the stopped measuring finished (a headline before the model's other entries)
    .venv/bin/python scripts/commit_measured.py
    files=$(ls rqlab/zoo/store/*.progress 2>/dev/null)
    if [ -z "$files" ]; then echo "no measurement in progress"; else
      # shellcheck disable=SC2086  (store names have no spaces)
      git add -f -- $files && git commit -q -m "zoo: unfinished measurements' progress at a session's stop ($(echo $files | wc -w) files; the next rqlab zoo measure resumes them)" -- $files \
        && echo "committed: $(echo $files | xargs -n1 basename | xargs)"
    fi
    # the findings report's finished runs (OUT/<run-id>, sealed) and its index; not the staging
    # folders of runs in progress (OUT/.<name>), which a rerun redoes
    if [ -d "$REPORT_OUT" ]; then
      git add -A -- "$REPORT_OUT" ":(exclude)$REPORT_OUT/.*" \
        && git commit -q -m "findings report: the runs finished at a session's stop (a rerun of \`$REPORT\` keeps them while rqlab's source is the same)" -- "$REPORT_OUT" \
        && echo "committed: $REPORT_OUT"
    fi
    ;;
  publish)
    if [ -n "$(pids "$REPORT")" ]; then echo "the findings report still runs: scripts/background.sh stop first" >&2; exit 2; fi
    .venv/bin/python - "$REPORT_OUT/summary.json" <<'PY' || exit 2
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except OSError as e:
    sys.exit(f"nothing to publish: {e}")
not_run = [c["id"] for c in s.get("claims", []) if c.get("verdict") in (None, "not run")]
if s.get("in_progress") or s.get("n_failed") or not_run:
    sys.exit(f"{sys.argv[1]} is not complete (in progress: {bool(s.get('in_progress'))}, failed runs: "
             f"{s.get('n_failed')}, claims not run: {not_run}): resume it with scripts/background.sh start report")
PY
    # the committed findings-next (if a stop committed some of it) leaves the index too
    was_tracked=$(git ls-tree -r --name-only HEAD -- "$REPORT_OUT" | head -n 1)
    git rm -rq --cached --ignore-unmatch -- "$PUBLISHED" "$REPORT_OUT" && rm -rf "$PUBLISHED" \
      && mv "$REPORT_OUT" "$PUBLISHED" || exit 1
    # the move committed first, so that the index below names a clean commit
    git add -A -- "$PUBLISHED" ":(exclude)$PUBLISHED/.*" \
      && git commit -q -m "findings report: $REPORT_OUT, complete, becomes $PUBLISHED" -- "$PUBLISHED" ${was_tracked:+"$REPORT_OUT"} \
      || exit 1
    # the index and summary rewritten where they now lie (every run reused: same source)
    .venv/bin/rqlab report --profile findings --out "$PUBLISHED" || exit 1
    .venv/bin/python -m rqlab.report.findings "$PUBLISHED/summary.json" docs/findings.md \
      --curves docs/zoo_curves.png --notes docs/findings-notes.md || exit 1
    git add -A -- "$PUBLISHED" ":(exclude)$PUBLISHED/.*" docs/findings.md docs/zoo_curves.png || exit 1
    if ! git diff --cached --quiet -- "$PUBLISHED" docs/findings.md docs/zoo_curves.png; then
      git commit -q -m "findings report published: its index rewritten in $PUBLISHED, docs/findings.md regenerated from it" \
         -- "$PUBLISHED" docs/findings.md docs/zoo_curves.png || exit 1
    fi
    echo "published: $PUBLISHED, docs/findings.md"
    ;;
  *) echo "usage: scripts/background.sh [start [train] [measure] [findings] [report]|status|pause|resume|stop|checkpoint|publish]" >&2; exit 2;;
esac
