#!/usr/bin/env bash
# A one-node SLURM on this machine, for the `restore-batch --cluster slurm` test.
#
#   tests/slurm_local.sh start DIR   write DIR/slurm.conf for this host, start munged,
#                                    slurmctld and slurmd (all state, logs and pid files
#                                    under DIR) and wait until `sinfo` shows the node idle
#   tests/slurm_local.sh stop DIR    stop the daemons started by `start DIR`
#
# Needs root and the Debian packages slurm-wlm and munge (`make system-packages`).
# Nothing under /etc/slurm is touched: clients find the cluster through
# SLURM_CONF=DIR/slurm.conf, which `start` prints as its last line. The daemons use
# ports $CRYOWAE_SLURMCTLD_PORT/$CRYOWAE_SLURMD_PORT (default 16817/16818, not SLURM's),
# no cgroups (proctrack/linuxproc, task/none) and no accounting, so they run inside a
# container as well.
# Exit status: 0 running, 3 cannot run here (not root, packages missing, a daemon
# failed to start; the reason is on stderr), 1 usage.
set -u

cmd=${1:-}
dir=${2:-}
if [[ -z "$cmd" || -z "$dir" ]]; then
  echo "usage: $0 start|stop DIR" >&2
  exit 1
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf="$dir/slurm.conf"
ctl_port=${CRYOWAE_SLURMCTLD_PORT:-16817}
d_port=${CRYOWAE_SLURMD_PORT:-16818}

cannot() { echo "slurm_local: $*" >&2; exit 3; }

stop_daemons() {
  # TERM all three at once, then KILL what is left after 3 s (this is a throw-away
  # test cluster: its saved state does not matter)
  local pids=() name pid
  for name in slurmd slurmctld munged; do
    pidfile="$dir/$name.pid"
    if [[ -s "$pidfile" ]]; then
      pid=$(cat "$pidfile")
      kill -0 "$pid" 2>/dev/null && kill "$pid" 2>/dev/null && pids+=("$pid")
      rm -f "$pidfile"
    fi
  done
  for _ in $(seq 30); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
  return 0
}

if [[ "$cmd" == stop ]]; then
  # cancel what is left of our jobs first so that slurmd does not leave workers behind
  if [[ -f "$conf" ]] && command -v scancel >/dev/null; then
    SLURM_CONF="$conf" timeout 5 scancel --partition=cryowae_test >/dev/null 2>&1 || true
  fi
  stop_daemons
  exit 0
fi
[[ "$cmd" == start ]] || { echo "usage: $0 start|stop DIR" >&2; exit 1; }

[[ "$(id -u)" == 0 ]] || cannot "needs root to run slurmd/munged (running as $(id -un))"
for exe in munged slurmctld slurmd sinfo sbatch; do
  command -v "$exe" >/dev/null || PATH="$PATH:/usr/sbin:/sbin"
  command -v "$exe" >/dev/null || cannot "$exe not found: install slurm-wlm and munge (make system-packages)"
done

stop_daemons  # a previous run's daemons on the same DIR

host=$(hostname -s)
cpus=$(nproc)
# RealMemory in MB, leaving 1 GB to the system
mem_mb=$(awk '/MemTotal/ {m = int($2 / 1024) - 1024; if (m < 512) m = 512; print m}' /proc/meminfo)

mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
chmod 755 "$dir" "$dir/spool"

# munge: a key of our own and a socket of our own, so a system munged is left alone
key="$dir/munge/munge.key"
[[ -s "$key" ]] || dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
chmod 700 "$dir/munge"
chmod 400 "$key"
sock="$dir/munge/munge.socket"
munged --force --key-file="$key" --socket="$sock" --pid-file="$dir/munged.pid" \
  --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed" 2>"$dir/log/munged.err" \
  || cannot "munged failed to start: $(tail -n 1 "$dir/log/munged.err" "$dir/log/munged.log" 2>/dev/null | tr '\n' ' ')"

cat >"$conf" <<EOF
# written by tests/slurm_local.sh: a one-node cluster for cryowae's tests
ClusterName=cryowae-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctl_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=cryowae_test Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

export SLURM_CONF="$conf"
slurmctld -f "$conf" 2>"$dir/log/slurmctld.err" \
  || cannot "slurmctld failed to start: $(tail -n 2 "$dir/log/slurmctld.log" "$dir/log/slurmctld.err" 2>/dev/null | tr '\n' ' ')"
slurmd -f "$conf" 2>"$dir/log/slurmd.err" \
  || cannot "slurmd failed to start: $(tail -n 2 "$dir/log/slurmd.log" "$dir/log/slurmd.err" 2>/dev/null | tr '\n' ' ')"

state=""
for _ in $(seq 60); do
  state=$(sinfo -h -N -n "$host" -o "%t" 2>/dev/null | head -n 1)
  [[ "$state" == idle ]] && break
  if [[ "$state" == down* || "$state" == drain* ]]; then
    scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
  fi
  sleep 0.5
done
if [[ "$state" != idle ]]; then
  reason=$(tail -n 3 "$dir/log/slurmd.log" "$dir/log/slurmctld.log" 2>/dev/null | tr '\n' ' ')
  stop_daemons
  cannot "node $host did not become idle (state '${state:-none}'): $reason"
fi
echo "SLURM_CONF=$conf"
