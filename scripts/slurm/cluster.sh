#!/usr/bin/env bash
# A throwaway single-node Slurm for tests and for trying scripts/slurm/train.sbatch:
#
#   scripts/slurm/cluster.sh start DIR   # installs what is missing, starts munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf      # every Slurm command (srun, sbatch, ...) reads this
#   scripts/slurm/cluster.sh stop DIR    # stops exactly the daemons `start` started (PID files)
#   scripts/slurm/cluster.sh install     # only installs the Debian packages (if missing)
#
# Runs as root, without systemd or cgroups: everything (config, keys, sockets, logs, state, PID
# files) lives under DIR, the daemons listen on their own ports (not Slurm's defaults) and their own
# munge socket, so a real Slurm or munge on the machine is neither used nor disturbed.
# The node is this machine (as `slurmd -C` describes it), one partition `debug`, no accounting.
# MpiDefault=none, as Debian ships it: jobs must ask `srun --mpi=pmix` themselves.
# KillWait=30: scancel and time limits send SIGTERM, then SIGKILL 30 s later, long enough for a
# checkpoint. Env CLUSTER_PORT (default 16817; slurmd listens on the next port) moves the ports.
set -euo pipefail

die() { echo "cluster.sh: $*" >&2; exit 1; }
usage() { die "usage: cluster.sh start|stop DIR, or cluster.sh install"; }
# A failed start stops what it had started.
fail() { stop "$1"; die "$2"; }

PKGS=(munge slurmctld slurmd slurm-client libpmix-dev)

install_missing() {
  local missing=() p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "needs root to install ${missing[*]}"
  echo "cluster.sh: installing ${missing[*]}"
  apt-get update -qq
  # No recommends: slurm-wlm-basic-plugins recommends every Slurm plugin and its -dev package.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Waits up to $2 seconds for command $1 to succeed.
wait_for() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    if eval "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  return 1
}

start() {
  local dir="$1"
  [ "$(id -u)" -eq 0 ] || die "start needs root (slurmd starts job steps as any user)"
  install_missing
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    die "a cluster is already running in $dir (stop it first)"
  fi
  mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
  chmod 700 "$dir/munge"
  local node host port
  # This machine as slurmd sees it (name, CPUs, sockets, cores, threads), so that it registers
  # without a mismatch; memory is left out (CR_CPU does not allocate it).
  node="$(slurmd -C | head -n1 | sed 's/ RealMemory=[0-9]*//')"
  host="${node#NodeName=}"
  host="${host%% *}"
  port="${CLUSTER_PORT:-16817}"

  # munge: its own key and socket; munged runs as root here (--force: it would rather not).
  if [ ! -s "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munged.seed" ||
    die "munged did not start: see $dir/munged.log"
  wait_for "munge -n -S '$dir/munge/munge.socket' | unmunge -S '$dir/munge/munge.socket'" 10 ||
    fail "$dir" "munged did not start: see $dir/munged.log"

  cat > "$dir/slurm.conf" <<EOF
# Written by scripts/slurm/cluster.sh: a single-node test cluster, everything under $dir.
ClusterName=fabbrica-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd, no cgroups: processes are tracked by parent pid, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# 1: a node that stopped responding comes back by itself when slurmd registers again; one set DOWN
# by `scontrol update state=down` (a simulated node failure) stays down until `state=resume`.
ReturnToService=1
# SIGTERM, then SIGKILL this many seconds later (scancel, time limits): time for a checkpoint.
KillWait=30
# Job records stay visible to scontrol for 10 minutes after the job ends.
MinJobAge=600
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (default 60 s; 30 s for backfill): a requeued job restarts promptly.
SchedulerParameters=sched_interval=2,bf_interval=2
MailProg=/bin/true
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$dir/slurm.conf"
  # -i: ignore state saved by an earlier cluster in this DIR.
  slurmctld -i -f "$SLURM_CONF" || fail "$dir" "slurmctld did not start: see $dir/slurmctld.log"
  wait_for "scontrol ping | grep -q UP" 20 || fail "$dir" "slurmctld did not start: see $dir/slurmctld.log"
  slurmd -f "$SLURM_CONF" || fail "$dir" "slurmd did not start: see $dir/slurmd.log"
  wait_for "sinfo -h -N -o %T | grep -Eq '^(idle|mixed|allocated)'" 30 ||
    fail "$dir" "slurmd did not register: see $dir/slurmd.log and $dir/slurmctld.log"
  echo "cluster.sh: Slurm is up in $dir (export SLURM_CONF=$SLURM_CONF)"
}

# Sends TERM to the daemon whose PID file is $1, waits for it, then KILL.
stop_one() {
  local f="$1" pid i
  [ -s "$f" ] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

stop() {
  local dir="$1" jobs i
  [ -d "$dir" ] || return 0
  # Jobs still there (a failed test): kill their processes, then let slurmd clean up their steps.
  if [ -s "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    jobs="$(SLURM_CONF="$dir/slurm.conf" squeue -h -o %i 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      SLURM_CONF="$dir/slurm.conf" scancel --full --signal=KILL $jobs 2>/dev/null || true
      # shellcheck disable=SC2086
      SLURM_CONF="$dir/slurm.conf" scancel $jobs 2>/dev/null || true
      for ((i = 0; i < 100; i++)); do
        [ -z "$(SLURM_CONF="$dir/slurm.conf" squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.1
      done
    fi
  fi
  stop_one "$dir/slurmd.pid"
  stop_one "$dir/slurmctld.pid"
  stop_one "$dir/munged.pid"
}

case "${1:-}" in
  start) [ $# -eq 2 ] || usage; start "$2" ;;
  stop) [ $# -eq 2 ] || usage; stop "$2" ;;
  install) [ $# -eq 1 ] || usage; install_missing ;;
  *) usage ;;
esac
