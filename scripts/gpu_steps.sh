# Sourced by scripts/gpu_check.sh and scripts/gpu_speed.sh: budgeted steps with hard timeouts.
# Needs BUDGET (seconds), START (epoch seconds), ONLY (comma list of wanted parts), LOGS (a folder) and
# STEPS (an array); STEP_KILL_AFTER (seconds between TERM and KILL) and STEP_TAIL (log lines echoed
# after a step) may be set before sourcing.
STEP_KILL_AFTER=${STEP_KILL_AFTER:-15}
STEP_TAIL=${STEP_TAIL:-4}

wants() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
now() { date +%s; }
left() { echo $(( BUDGET - ($(now) - START) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
max() { if [ "$1" -gt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# step NAME LIMIT_S CMD...: run with a hard timeout, log to $LOGS/NAME.log, record rc and seconds
# ("NAME|result|seconds" appended to STEPS); a limit under 5 s skips the step as "budget spent".
step() {
  local name=$1 limit=$2; shift 2
  local t0 rc res dt
  t0=$(now)
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped (budget spent)" | tee "$LOGS/$name.log"
    STEPS+=("$name|skipped|0")
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after="$STEP_KILL_AFTER" "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  dt=$(( $(now) - t0 ))
  case $rc in
    0) res=ok ;;
    124|137) res="TIMEOUT(rc=$rc)" ;;
    *) res="FAILED(rc=$rc)" ;;
  esac
  echo "   -> $res in ${dt}s; last lines:"
  tail -n "$STEP_TAIL" "$LOGS/$name.log" | sed 's/^/      /'
  STEPS+=("$name|$res|$dt")
}
