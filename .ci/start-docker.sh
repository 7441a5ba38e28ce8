#!/usr/bin/env bash
# Give this machine a Docker engine for the classify contract tests (CI and dev boxes).
#
# Idempotent: installs Debian's docker.io and debootstrap only if they are missing, starts
# dockerd only if no daemon answers, then waits (up to 60 s) until `docker info` does.
# The flags are the ones that work in our CI containers: vfs needs no overlay support, and with
# no bridge and no iptables the engine never touches the host's network (the tests run every
# container with network_mode="none" anyway).
set -euo pipefail

LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
WAIT_S=${DOCKERD_WAIT_S:-60}

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if ((${#need[@]})); then
    echo "start-docker: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if docker info >/dev/null 2>&1; then
    echo "start-docker: a Docker engine already answers"
    exit 0
fi

echo "start-docker: starting dockerd (log: $LOG)"
mkdir -p "$(dirname "$LOG")"
# setsid + nohup: the daemon outlives this script and the CI step that ran it.
setsid nohup dockerd --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none \
    >>"$LOG" 2>&1 </dev/null &

for ((i = 0; i < WAIT_S; i++)); do
    if docker info >/dev/null 2>&1; then
        echo "start-docker: engine up after ${i}s ($(docker version --format '{{.Server.Version}}'))"
        exit 0
    fi
    sleep 1
done
echo "start-docker: error: dockerd did not answer within ${WAIT_S}s; last lines of $LOG:" >&2
tail -n 20 "$LOG" >&2
exit 1
