#!/usr/bin/env bash
# `make pin`: resolve every base image tag to its digest and write it where the build reads it: the
# ${<VENDOR>_BASE_IMAGE:-tag@sha256:...} defaults in docker/compose.vendors.yaml (every vendor in the file: cuda,
# cuda12, rocm, cpu), passed to docker/Dockerfile as BASE_IMAGE, so FROM uses tag@digest and the image label
# org.opencontainers.image.base.name records it. tests/test_container_static.py checks the form.
#
# Online it asks the registry (Docker Hub's token + manifest HEAD for the multi-arch index; no docker login, no pull).
# Offline, or for a registry it cannot reach, it keeps what is written and says so; --strict makes that an error.
#   docker/pin.sh [--strict] [--check]     --check: only print tag -> digest, change nothing
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=docker/compose.vendors.yaml
STRICT=0; CHECK=0
for a in "$@"; do
  case "$a" in
    --strict) STRICT=1 ;; --check) CHECK=1 ;;
    *) echo "usage: $0 [--strict] [--check]" >&2; exit 2 ;;
  esac
done

ACCEPT='application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.list.v2+json,application/vnd.docker.distribution.manifest.v2+json,application/vnd.oci.image.manifest.v1+json'

# tag reference -> sha256 digest of its manifest (list), from Docker Hub; empty output when it cannot be resolved
resolve() {
  local ref=$1 repo tag token digest
  repo=${ref%:*}; tag=${ref##*:}
  case "$repo" in */*) ;; *) repo="library/$repo" ;; esac
  case "$repo" in
    *.*/*|localhost/*|local/*) return 0 ;;   # another registry or a local image: not resolved here
  esac
  token=$(curl -fsS --max-time 20 "https://auth.docker.io/token?service=registry.docker.io&scope=repository:$repo:pull" \
          2>/dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])' 2>/dev/null) || return 0
  digest=$(curl -fsS --max-time 20 -I -H "Authorization: Bearer $token" -H "Accept: $ACCEPT" \
          "https://registry-1.docker.io/v2/$repo/manifests/$tag" 2>/dev/null \
          | tr -d '\r' | awk -F': ' 'tolower($1)=="docker-content-digest" {print $2}') || return 0
  case "$digest" in sha256:*) printf '%s' "$digest" ;; esac
}

failed=0
vendors=$(sed -n 's/.*\${\([A-Z0-9]*\)_BASE_IMAGE:-[^}]*}.*/\1/p' "$FILE" | sort -u)
[ -n "$vendors" ] || { echo "pin: no <VENDOR>_BASE_IMAGE default in $FILE" >&2; exit 1; }
for vendor in $vendors; do
  pinned=$(sed -n "s/.*\${${vendor}_BASE_IMAGE:-\([^}]*\)}.*/\1/p" "$FILE" | head -n 1)
  ref=${pinned%@*}
  new=$(resolve "$ref")
  if [ -z "$new" ]; then
    echo "pin: $ref ($vendor): digest not resolvable here (offline or registry unreachable); keeping '$pinned'" >&2
    failed=1; continue
  fi
  echo "pin: $ref ($vendor) -> $new"
  if [ "$CHECK" = 0 ] && [ "$ref@$new" != "$pinned" ]; then
    sed -i "s|\${${vendor}_BASE_IMAGE:-[^}]*}|\${${vendor}_BASE_IMAGE:-$ref@$new}|" "$FILE"
  fi
done
# a plain `docker build` (no compose) uses the Dockerfile's default: the cpu base, pinned the same way
# shellcheck disable=SC2016  # a literal ${ in the pattern
cpu=$(sed -n 's/.*\${CPU_BASE_IMAGE:-\([^}]*\)}.*/\1/p' "$FILE" | head -n 1)
if [ "$CHECK" = 0 ] && [ -n "$cpu" ]; then sed -i "s|^ARG BASE_IMAGE=.*|ARG BASE_IMAGE=$cpu|" docker/Dockerfile; fi
if [ "$failed" = 1 ] && [ "$STRICT" = 1 ]; then exit 1; fi
exit 0
