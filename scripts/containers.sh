#!/usr/bin/env bash
# Containers on this machine: host set-up, the Debian base image, the project's images, and the
# Docker-compatible podman socket that `llmneo run --runner containers` talks to.
#
#   scripts/containers.sh setup      # podman + runc + debootstrap and /etc/containers/containers.conf (root, apt)
#   scripts/containers.sh base       # the base image from Debian packages (no registry pull), once
#   scripts/containers.sh images     # build images/Dockerfile and images/Dockerfile.cpu (Docker or podman)
#   scripts/containers.sh socket     # start `podman system service`; prints DOCKER_HOST=unix://...
#   scripts/containers.sh engine     # print the engine the other commands use (docker | podman | none)
#   scripts/containers.sh ci         # setup where possible, then images; without any engine: a note, exit 0
#
# Every command is idempotent. Environment: LLMNEO_IMAGE / LLMNEO_CPU_IMAGE (tags, components/images.py),
# BASE_IMAGE (the Dockerfiles' base; default: the public python:3.11-slim-bookworm with Docker, the
# local Debian-built $LOCAL_BASE with podman), PIP_WHEELS (a folder of wheels that pip prefers at build
# time, e.g. a local CPU torch wheel; podman only), LLMNEO_SOCKET (the podman socket path).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LOCAL_BASE=${LOCAL_BASE:-localhost/llmneo-base:bookworm-py3.11}
SOCKET=${LLMNEO_SOCKET:-/run/llmneo/podman.sock}
# Debian bookworm's own versions (the ones this project is tested with). crun 1.8 (podman's default
# runtime there) cannot run on hybrid cgroups, so runc; podman's root ulimit defaults exceed the hard
# limits of many CI machines (setrlimit EPERM), so explicit ones.
PACKAGES=(podman=4.3.1+ds1-8+deb12u1+b3 runc=1.1.5+ds1-1+deb12u1 debootstrap=1.0.128+nmu2+deb12u2)
CONF=/etc/containers/containers.conf
CONF_TEXT='# written by llmneo scripts/containers.sh setup
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=16384:16384"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
'

log() { echo "containers: $*" >&2; }

engine() {
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker
  elif command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then echo podman
  else echo none; fi
}

cmd_setup() {
  local missing=()
  for pkg in "${PACKAGES[@]}"; do
    command -v "${pkg%%=*}" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
      log "missing ${missing[*]%%=*}: install them (Debian/Ubuntu: apt-get install podman runc debootstrap) or use Docker"
      return 1
    fi
    log "installing ${missing[*]}"
    apt-get update -qq
    # the pinned bookworm versions; where the mirror has moved on, the distribution's current ones
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]%%=*}" >/dev/null
  fi
  if [[ ! -f $CONF ]] || ! grep -q 'runtime = "runc"' "$CONF"; then
    if [[ -f $CONF ]]; then
      log "$CONF exists without runtime = \"runc\": leaving it alone (see scripts/containers.sh for the settings)"
    elif [[ $(id -u) == 0 ]]; then
      mkdir -p "$(dirname "$CONF")" && printf '%s' "$CONF_TEXT" > "$CONF" && log "wrote $CONF"
    fi
  fi
  podman info >/dev/null 2>&1 || { log "podman is installed but cannot run containers: podman info"; podman info >&2; return 1; }
}

# A python:3.11-slim-like image made from Debian packages only: debootstrap (minbase) + Debian's
# python3.11 in a venv at /opt/python (first on PATH, so `python` and `pip` are the venv's).
cmd_base() {
  if podman image exists "$LOCAL_BASE"; then log "base image $LOCAL_BASE exists"; return 0; fi
  command -v debootstrap >/dev/null || { log "debootstrap missing: scripts/containers.sh setup"; return 1; }
  local dir
  dir=$(mktemp -d /var/tmp/llmneo-base.XXXXXX)
  trap 'rm -rf "$dir"; trap - RETURN' RETURN
  log "debootstrap bookworm into $dir"
  debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,python3-pip-whl,python3-setuptools-whl,ca-certificates \
    bookworm "$dir/root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$dir/debootstrap.log" 2>&1 \
    || { tail -20 "$dir/debootstrap.log" >&2; return 1; }
  chroot "$dir/root" /usr/bin/python3.11 -m venv /opt/python
  ln -sf /opt/python/bin/python /opt/python/bin/python3 2>/dev/null || true
  rm -rf "$dir"/root/usr/share/{doc,man,info,locale}/* "$dir"/root/var/lib/apt/lists/* "$dir"/root/var/cache/apt/*.bin "$dir"/root/var/cache/apt/archives/*.deb
  tar -C "$dir/root" --numeric-owner -c . | podman import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python"]' - "$LOCAL_BASE" >/dev/null
  log "built $LOCAL_BASE ($(podman image inspect --format '{{.Size}}' "$LOCAL_BASE" | awk '{printf "%.0f MB", $1/1e6}'))"
}

# pip inside a podman build sees the host's pip settings (certificate bundle, local wheel folders and
# indexes) through read-only mounts of the build's RUN steps only: nothing of them stays in an image.
pip_build_mounts() {
  local tmp=$1 conf=$tmp/pip.conf cert paths=() value
  cert=${PIP_CERT:-$($PYTHON -m pip config get global.cert 2>/dev/null || true)}
  cert=${cert:-${SSL_CERT_FILE:-}}
  {
    echo "[global]"
    [[ -n $cert && -f $cert ]] && { cp "$cert" "$tmp/ca.pem"; echo "cert = /run/llmneo-build/ca.pem"; }
    for key in index-url extra-index-url; do
      value=$($PYTHON -m pip config get "global.$key" 2>/dev/null || true)
      [[ -n $value ]] && echo "$key = $value" && for url in $value; do
        [[ $url == file://* ]] && paths+=("${url#file://}")
      done
    done
    value="${PIP_WHEELS:-} ${PIP_FIND_LINKS:-$($PYTHON -m pip config get global.find-links 2>/dev/null || true)}"
    local links=()
    for p in $value; do [[ -d $p ]] && links+=("$p") && paths+=("$p"); done
    ((${#links[@]})) && echo "find-links = ${links[*]}"
  } > "$conf"
  echo "--volume $tmp:/run/llmneo-build:ro --volume $conf:/etc/pip.conf:ro"
  for p in "${paths[@]}"; do
    p=${p%/simple}; p=${p%/}
    [[ -d $p ]] && echo "--volume $p:$p:ro"
  done
}

image_ref() { $PYTHON -c "import runpy; print(runpy.run_path('components/images.py')['$1'])"; }

cmd_images() {
  local eng image cpu_image base start
  eng=$(engine)
  if [[ $eng == none ]] && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    cmd_setup && eng=$(engine)
  fi
  if [[ $eng == none ]]; then
    echo "make images: no container engine on this machine (no running Docker, no working podman): nothing built."
    echo "  Install podman (scripts/containers.sh setup, as root on Debian) or run it where Docker works;"
    echo "  LLMNEO_IMAGE=... LLMNEO_CPU_IMAGE=... set the tags (components/images.py)."
    return 1
  fi
  image=$(image_ref IMAGE); cpu_image=$(image_ref CPU_IMAGE)
  local args=()
  if [[ $eng == podman ]]; then
    base=${BASE_IMAGE:-$LOCAL_BASE}
    [[ $base == "$LOCAL_BASE" ]] && cmd_base
    local tmp; tmp=$(mktemp -d); trap 'rm -rf "$tmp"; trap - RETURN' RETURN
    # shellcheck disable=SC2207
    args=(--network host $(pip_build_mounts "$tmp"))
  else
    base=${BASE_IMAGE:-python:3.11-slim-bookworm}
  fi
  for pair in "images/Dockerfile:$image" "images/Dockerfile.cpu:$cpu_image"; do
    start=$(date +%s)
    log "$eng build -f ${pair%%:*} -t ${pair#*:} (base $base)"
    # (pip's notes about projects missing from a local file index are noise here)
    $eng build -q "${args[@]}" --build-arg "BASE_IMAGE=$base" -f "${pair%%:*}" -t "${pair#*:}" . \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) >/dev/null
    log "built ${pair#*:} in $(( $(date +%s) - start )) s, $($eng image inspect --format '{{.Size}}' "${pair#*:}" | awk '{printf "%.0f MB", $1/1e6}')"
  done
}

cmd_socket() {
  if [[ -S $SOCKET ]] && curl -sf --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1; then
    echo "DOCKER_HOST=unix://$SOCKET"; return 0
  fi
  mkdir -p "$(dirname "$SOCKET")"
  rm -f "$SOCKET"
  nohup podman system service --time=0 "unix://$SOCKET" >"$(dirname "$SOCKET")/podman-service.log" 2>&1 &
  for _ in $(seq 50); do
    curl -sf --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1 && { echo "DOCKER_HOST=unix://$SOCKET"; return 0; }
    sleep 0.2
  done
  log "podman system service did not answer on $SOCKET"; return 1
}

case "${1:-}" in
  setup) cmd_setup ;;
  base) cmd_setup && cmd_base ;;
  images) cmd_images ;;
  socket) cmd_socket ;;
  engine) engine ;;
  ci)
    if [[ $(engine) == none ]] && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then cmd_setup; fi
    if [[ $(engine) == none ]]; then
      log "no container engine here (no running Docker, no working podman): the container tests will be skipped"
    else
      cmd_images
    fi ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
