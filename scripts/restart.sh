#!/usr/bin/env bash
# Keeps a training run going without a scheduler: runs the command, and when it fails, runs it
# again (it resumes from its newest checkpoint), with exponential backoff.
#
#   scripts/restart.sh [-n MAX] [--backoff SECONDS] -- mpirun -np 8 fabbrica train ... --set run.resume=auto
#
# The command is run as given; it must contain run.resume=auto (a restart that starts from step 0
# would throw the progress away, one that demands a checkpoint could not start the first time).
#   exit 0            training finished: stop (exit 0)
#   exit 2            fabbrica refused its input (config, data, launch): restarting cannot fix it
#   any other exit    75 = stopped by a signal with a checkpoint (preempted), others = a crash:
#                     restart after BACKOFF, 2*BACKOFF, 4*BACKOFF... seconds (at most an hour),
#                     at most MAX times (default 10; backoff default 10 s); one line per restart
# SIGTERM, SIGINT (Ctrl-C), SIGHUP or SIGUSR1 to this script: the run is asked to stop with a
# checkpoint (SIGUSR1 to the command, which mpirun forwards to every rank) and is not restarted;
# the script exits with the run's exit code (75). A second signal is passed on as it is (a second
# Ctrl-C ends the run at once). The command runs in its own session with stdin from /dev/null, so
# a Ctrl-C on the terminal reaches this script only.
# OMPI_MCA_odls_base_sigkill_timeout defaults to 5 here (Open MPI's is 1 s). A graceful stop goes
# through SIGUSR1, which mpirun forwards at once; the timeout only paces mpirun's teardown (it
# sleeps it twice after any non-zero exit, even when every rank is gone), so a long one would
# delay every restart for nothing. A little over 1 s spares ranks that are closing files.
set -uo pipefail

usage="usage: restart.sh [-n MAX] [--backoff SECONDS] -- COMMAND... (containing run.resume=auto)"
die() { echo "restart.sh: $*" >&2; exit 2; }

max=10
backoff=10
while [ $# -gt 0 ]; do
  case "$1" in
    -n) [ $# -ge 2 ] || die "$usage"; max="$2"; shift 2 ;;
    --backoff) [ $# -ge 2 ] || die "$usage"; backoff="$2"; shift 2 ;;
    -h | --help) echo "$usage"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' ($usage)" ;;
  esac
done
[ $# -gt 0 ] || die "no command ($usage)"
[[ "$max" =~ ^[0-9]+$ ]] || die "-n $max: give a whole number of restarts"
[[ "$backoff" =~ ^[0-9]+$ ]] || die "--backoff $backoff: give a whole number of seconds"
case " $* " in
  *run.resume=auto*) ;;
  *) die "the command must resume from its checkpoint when restarted: add --set run.resume=auto to its fabbrica train arguments" ;;
esac

export OMPI_MCA_odls_base_sigkill_timeout="${OMPI_MCA_odls_base_sigkill_timeout:-5}"

stopping=""
child=""
on_signal() {
  if [ -z "$stopping" ]; then
    stopping="$1"
    echo "restart.sh: SIG$1: the run is asked to stop with a checkpoint (SIGUSR1) and will not be restarted" >&2
    if [ -n "$child" ]; then kill -USR1 "$child" 2>/dev/null; fi
  elif [ -n "$child" ]; then
    kill -"$1" "$child" 2>/dev/null
  fi
}
for sig in TERM INT HUP USR1; do
  # shellcheck disable=SC2064
  trap "on_signal $sig" "$sig"
done

# Waits for the child; `wait` returns early (status > 128) whenever a trapped signal arrives.
wait_child() {
  while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  # bash remembers an ended child's status: read it again in case the trap cut the last wait short.
  if [ "$rc" -gt 128 ]; then
    local r
    wait "$child"
    r=$?
    [ "$r" -eq 127 ] || rc=$r
  fi
  child=""
}

restarts=0
rc=0
while :; do
  # setsid: its own session, so a terminal's Ctrl-C does not reach mpirun directly (this script
  # decides what the run gets). A background child of a script is no group leader, so setsid
  # execs the command in place and $! is the command's pid.
  setsid "$@" < /dev/null &
  child=$!
  # A signal that came while starting it.
  if [ -n "$stopping" ]; then kill -USR1 "$child" 2>/dev/null; fi
  wait_child
  if [ -n "$stopping" ]; then
    echo "restart.sh: the run stopped after SIG$stopping (exit $rc)" >&2
    exit "$rc"
  fi
  case "$rc" in
    0) exit 0 ;;
    2) echo "restart.sh: the run refused its input (exit 2): not restarting" >&2; exit 2 ;;
    75) why="preempted (exit 75)" ;;
    *) why="crashed (exit $rc)" ;;
  esac
  if [ "$restarts" -ge "$max" ]; then
    echo "restart.sh: the run $why; giving up after $max restarts" >&2
    exit "$rc"
  fi
  restarts=$((restarts + 1))
  delay=$backoff
  for ((i = 1; i < restarts && delay < 3600; i++)); do delay=$((delay * 2)); done
  [ "$delay" -le 3600 ] || delay=3600
  echo "restart.sh: the run $why; restart $restarts of $max in ${delay}s" >&2
  # In the background, so that a signal ends the wait at once.
  sleep "$delay" &
  child=$!
  wait "$child" 2>/dev/null
  kill "$child" 2>/dev/null
  child=""
  if [ -n "$stopping" ]; then
    echo "restart.sh: not restarting after SIG$stopping" >&2
    exit "$rc"
  fi
done
