# shellcheck shell=bash
# Shared helpers for the hvtune container entrypoints (sourced, not executed).
#
# Every check runs before anything is written, prints ONE actionable line and exits non-zero (2 = bad input,
# the same code hvtune uses), so a misconfigured run leaves nothing half-written behind.
#
# Layout inside the container (HVTUNE_DATA_ROOT, default /data; /workspace on RunPod for `all`):
#   datasets/  clips + captions (read-only)     models/  HF_HOME and mounted encoders
#   cache/     hvtune caches + every tool cache  outputs/ LoRA, checkpoints, run.json, validation videos

HV_NAME=${HV_NAME:-$(basename "$0")}
HV_IMAGE_ROOT=/data
HV_MEDIA_EXT='mp4|mov|mkv|webm|avi|m4v|png|jpg|jpeg|webp|bmp'

hv_log() { printf '[%s] %s\n' "$HV_NAME" "$*" >&2; }
hv_die() { printf '[%s] error: %s\n' "$HV_NAME" "$*" >&2; exit 2; }

# A path under the image's /data moves under HVTUNE_DATA_ROOT when that differs (RunPod: /workspace).
hv_rebase() {
  local value=$1
  if [ "$HV_DATA_ROOT" != "$HV_IMAGE_ROOT" ] && [[ "$value" == "$HV_IMAGE_ROOT"/* ]]; then
    value="$HV_DATA_ROOT${value#"$HV_IMAGE_ROOT"}"
  fi
  printf '%s' "$value"
}

# Resolved training keys, asked of hvtune itself (the same file < HVTUNE_<KEY> < default layering, key aliases and
# types as training; nothing is re-parsed here): sets HV_KEY_<key> (the value, empty when unset) and HV_SRC_<key>
# (default, file:PATH or env:VAR). A bad config file stops here with hvtune's own message and exit code.
hv_resolve() {
  local out rc=0 key source value
  out=$(hvtune config get "${HV_CONFIG_ARGS[@]}" "$@" 2>&1) || rc=$?
  if [ "$rc" != 0 ]; then printf '[%s] %s\n' "$HV_NAME" "$out" >&2; exit "$rc"; fi
  while IFS=$'\t' read -r key source value; do
    printf -v "HV_KEY_$key" '%s' "$value"
    printf -v "HV_SRC_$key" '%s' "$source"
  done <<<"$out"
}

# Started as root (compose, RunPod, Vast, `docker run` without --user): create the folders the run writes under the
# data root, hand them to PUID:PGID and run this entrypoint again as that user (setpriv, util-linux), so no hvtune
# process runs as root, outputs belong to a normal uid, and any uid works without rebuilding the image. PUID/PGID
# default to the owner of the data root, or 1000:1000 when root owns it (a RunPod volume). HVTUNE_RUN_AS_ROOT=1
# keeps root. Started as another uid: nothing to do.
# Which folders are handed over: compose names each folder's host side (HVTUNE_HOST_<X>_DIR); a name is one of its
# named volumes, which only the container can repair (e.g. left root-owned by an earlier PUID=0 run), so it is
# chowned; a host path is your folder, checked and never chowned. Without compose (RunPod, Vast) all three are.
hv_drop_root() {
  # only inside hvtune's image (HVTUNE_IMAGE_TAG is set there): root on a bare host running these scripts stays root
  [ "$(id -u)" = 0 ] && [ -n "${HVTUNE_IMAGE_TAG:-}" ] && [ "${HVTUNE_RUN_AS_ROOT:-0}" != 1 ] || return 0
  local root owner uid gid name dir host groups handed=()
  root=${HVTUNE_DATA_ROOT:-$HV_IMAGE_ROOT}
  root=${root%/}
  owner=$(stat -c '%u:%g' "$root" 2>/dev/null) || owner=0:0
  [ "${owner%%:*}" != 0 ] || owner=1000:1000
  uid=${PUID:-${owner%%:*}} gid=${PGID:-${owner##*:}}
  [[ "$uid" =~ ^[0-9]+$ && "$gid" =~ ^[0-9]+$ ]] || hv_die "PUID=$uid / PGID=$gid must be numeric ids (id -u, id -g)"
  [ "$uid" != 0 ] || hv_die "PUID=0 would train as root: set PUID and PGID (.env, or -e) to a normal user's ids, e.g. PUID=1000 PGID=1000 (as root on the host: 'chown 1000:1000 ${HVTUNE_HOST_OUTPUT_DIR:-<your outputs folder>}' too), or HVTUNE_RUN_AS_ROOT=1 to keep root on purpose"
  command -v setpriv >/dev/null || hv_die "started as root but setpriv (util-linux) is missing from the image: start the container as a normal uid (--user)"
  for name in models cache outputs; do
    case $name in models) host=${HVTUNE_HOST_MODELS_DIR:-} ;; cache) host=${HVTUNE_HOST_CACHE_DIR:-} ;; *) host=${HVTUNE_HOST_OUTPUT_DIR:-} ;; esac
    # compose's own rule: a volume source starting with . / or ~ is a host path, anything else a named volume
    case $host in .*|/*|\~*) continue ;; esac
    dir=$root/$name
    # a read-only mount stays as it is; the writable checks that follow name it
    mkdir -p "$dir" 2>/dev/null || continue
    find "$dir" -xdev \( ! -uid "$uid" -o ! -gid "$gid" \) -exec chown -h "$uid:$gid" {} + 2>/dev/null || true
    handed+=("$name")
  done
  if [ "${#handed[@]}" = 0 ]; then
    hv_log "started as root: continuing as uid:gid $uid:$gid (PUID/PGID choose it); your folders are checked, not chowned"
  else
    hv_log "started as root: $root/{$(IFS=,; echo "${handed[*]}")} handed to uid:gid $uid:$gid, continuing as that user (PUID/PGID choose it)"
  fi
  # keep access to GPU device nodes that belong to a group (ROCm: /dev/kfd and /dev/dri/* are video/render)
  groups=$(stat -c %g /dev/kfd /dev/dri/* 2>/dev/null | sort -un | grep -vx 0 | paste -sd, -) || true
  if [ -n "$groups" ]; then set -- --groups "$groups" "$@"; else set -- --clear-groups "$@"; fi
  exec setpriv --reuid "$uid" --regid "$gid" "$@"
}

# Environment shared by every entrypoint: data root, caches under it, config file, dataset/cache/output dirs.
# shellcheck disable=SC2154  # HV_KEY_<key> and HV_SRC_<key> are assigned by hv_resolve (printf -v)
hv_env() {
  hv_machines_from_platform
  hv_check_machines
  HV_DATA_ROOT=${HVTUNE_DATA_ROOT:-$HV_IMAGE_ROOT}
  HV_DATA_ROOT=${HV_DATA_ROOT%/}
  export HVTUNE_DATA_ROOT=$HV_DATA_ROOT
  local var
  for var in HF_HOME TORCH_HOME XDG_CACHE_HOME TRITON_CACHE_DIR TORCHINDUCTOR_CACHE_DIR MPLCONFIGDIR \
             HUNYUANVIDEO_TEXT_ENCODER_PATH HUNYUANVIDEO_VISION_ENCODER_PATH; do
    if [ -n "${!var:-}" ]; then export "$var=$(hv_rebase "${!var}")"; fi
  done
  : "${HF_HOME:=$HV_DATA_ROOT/models/huggingface}"
  export HF_HOME

  HV_CONFIG=${HVTUNE_CONFIG:-}
  if [ -z "$HV_CONFIG" ] && [ -f "$HV_DATA_ROOT/config/config.json" ]; then HV_CONFIG=$HV_DATA_ROOT/config/config.json; fi
  if [ -n "$HV_CONFIG" ] && [ ! -f "$HV_CONFIG" ]; then
    hv_die "config file $HV_CONFIG (HVTUNE_CONFIG) does not exist; mount it or unset HVTUNE_CONFIG to configure with HVTUNE_* variables"
  fi
  # HV_CONFIG_ARGS is used by the entrypoints that source this file
  # shellcheck disable=SC2034
  HV_CONFIG_ARGS=()
  # shellcheck disable=SC2034
  if [ -n "$HV_CONFIG" ]; then HV_CONFIG_ARGS=(--config "$HV_CONFIG"); fi

  # the folder keys left at hvtune's defaults take the container layout; a value from the config file or the
  # environment is kept as hvtune reads it (relative paths: relative to the data root, the working directory)
  cd "$HV_DATA_ROOT" 2>/dev/null || cd /
  hv_resolve data_backend_config instance_data_dir output_dir cache_dir
  HV_OUTPUT_DIR=$HV_KEY_output_dir
  if [ "$HV_SRC_output_dir" = default ]; then HV_OUTPUT_DIR=$HV_DATA_ROOT/outputs; export HVTUNE_OUTPUT_DIR=$HV_OUTPUT_DIR; fi
  HV_CACHE_DIR=$HV_KEY_cache_dir
  if [ "$HV_SRC_cache_dir" = default ]; then HV_CACHE_DIR=$HV_DATA_ROOT/cache/hvtune; export HVTUNE_CACHE_DIR=$HV_CACHE_DIR; fi
  HV_DATASET_DIR=""
  if [ -z "$HV_KEY_data_backend_config" ]; then
    HV_DATASET_DIR=${HV_KEY_instance_data_dir:-$HV_DATA_ROOT/datasets}
    export HVTUNE_INSTANCE_DATA_DIR=$HV_DATASET_DIR
  fi
}

hv_is_mountpoint() {
  local dir
  dir=$(cd "$1" 2>/dev/null && pwd -P) || return 1
  awk -v d="$dir" '$5 == d {found=1} END {exit !found}' /proc/self/mountinfo
}

# Missing dataset mount / empty dataset folder. A multidatabackend.json is validated by `hvtune check` instead.
hv_check_dataset() {
  [ -n "$HV_DATASET_DIR" ] || return 0
  local dir=$HV_DATASET_DIR
  if [ ! -d "$dir" ]; then
    hv_die "dataset folder $dir does not exist: mount your clips there (compose: DATASET_DIR in .env; docker run: -v /path/to/clips:$dir:ro)"
  fi
  if [ ! -r "$dir" ] || [ ! -x "$dir" ]; then
    hv_die "dataset folder $dir is not readable by uid $(id -u): make it readable on the host (chmod -R a+rX) or set PUID/PGID to its owner"
  fi
  if ! find -L "$dir" -type f -regextype posix-extended -iregex ".*\.($HV_MEDIA_EXT)$" -print -quit 2>/dev/null | grep -q .; then
    if [[ "$dir" == "$HV_IMAGE_ROOT"/* ]] && ! hv_is_mountpoint "$dir" && [ -z "$(ls -A "$dir" 2>/dev/null)" ]; then
      hv_die "dataset folder $dir is not mounted: set DATASET_DIR in .env to your clips folder (docker run: -v /path/to/clips:$dir:ro)"
    fi
    hv_die "dataset folder $dir${HVTUNE_HOST_DATASET_DIR:+ (host: $HVTUNE_HOST_DATASET_DIR)} has no video or image files: put .mp4 clips with .txt captions there, or point DATASET_DIR at them"
  fi
}

# A folder the run writes to must accept a new file from this uid/gid. A folder that does not exist yet is judged by
# its nearest existing parent (it is created later by hvtune), so a failed check leaves nothing behind.
# $3: the host-side path, when known, to word the fix.
hv_check_writable() {
  local dir=$1 what=$2 host=${3:-} probe ids at fix
  ids="$(id -u):$(id -g)"
  # a host folder: chown it on the host; a named volume (or unknown): let a root start hand it over
  fix="run 'sudo chown -R $ids $host' on the host, or set PUID/PGID in .env to its owner"
  [ -n "$host" ] || fix="start the container as root (no --user) with PUID=$(id -u) PGID=$(id -g) in its environment: it hands its folders to that uid, then drops root"
  at=$dir
  while [ ! -d "$at" ] && [ "$at" != / ]; do at=$(dirname "$at"); done
  if ! probe=$(mktemp -p "$at" .hvtune-write-test.XXXXXX 2>/dev/null); then
    if [ "$at" = "$dir" ]; then
      hv_die "$what folder $dir is not writable by uid:gid $ids: $fix"
    fi
    hv_die "$what folder $dir cannot be created by uid:gid $ids ($at is not writable): $fix"
  fi
  rm -f "$probe"
}

# Every folder that cache AND train need, checked by each service (and `all`) before the first download, so a
# read-only or root-owned outputs folder stops `cache` at once instead of `train` after the whole cache was built.
# $1 = models: the models folder too (where `hvtune fetch` downloads into HF_HOME; train only reads it).
hv_check_folders() {
  hv_check_dataset
  if [ "${1:-}" = models ]; then hv_check_writable "$HF_HOME" "models (HF_HOME)" "$(hv_host_of models)"; fi
  hv_check_writable "$HV_CACHE_DIR" "cache" "$(hv_host_of cache)"
  hv_check_writable "$HV_OUTPUT_DIR" "output" "$(hv_host_of outputs)"
}

# The host path behind a folder of the data root (compose's HVTUNE_HOST_<X>_DIR), empty for a named volume or unknown.
hv_host_of() {
  local host
  case $1 in models) host=${HVTUNE_HOST_MODELS_DIR:-} ;; cache) host=${HVTUNE_HOST_CACHE_DIR:-} ;; *) host=${HVTUNE_HOST_OUTPUT_DIR:-} ;; esac
  case $host in .*|/*|\~*) printf '%s' "$host" ;; esac
}

# No GPU visible in the cuda/rocm image. HVTUNE_SKIP_GPU_CHECK=1 skips it (e.g. `hvtune check` on a login node).
hv_check_gpu() {
  [ "${HVTUNE_SKIP_GPU_CHECK:-0}" = 1 ] && return 0
  # shellcheck source=entrypoints/driver-check.sh
  source "$(dirname "${BASH_SOURCE[0]}")/driver-check.sh" && hv_check_driver # host driver floor of this image
  case "${HVTUNE_VENDOR:-cpu}" in
    cuda)
      if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        hv_die "no NVIDIA GPU visible in the container: install the NVIDIA Container Toolkit on the host and run with --gpus all (compose: profile cuda), or use the cpu profile"
      fi ;;
    rocm)
      if [ ! -e /dev/kfd ] || ! compgen -G '/dev/dri/renderD*' >/dev/null; then
        hv_die "no AMD GPU visible in the container: run with --device /dev/kfd --device /dev/dri --group-add video --group-add render (compose: profile rocm)"
      fi
      if [ ! -r /dev/kfd ] || [ ! -w /dev/kfd ]; then
        hv_die "/dev/kfd is not accessible to uid $(id -u): add the container user to the host's video and render groups (group_add, or --group-add \$(getent group render | cut -d: -f3))"
      fi ;;
    cpu) return 0 ;;
    *) hv_die "HVTUNE_VENDOR=$HVTUNE_VENDOR is not one of cuda, rocm, cpu" ;;
  esac
  # before any download: will the configured setting fit this card (hvtune plan; advice only, never fatal)
  if [ "${HVTUNE_SKIP_PLAN:-0}" != 1 ]; then
    hvtune plan "${HV_CONFIG_ARGS[@]}" --gpu auto --verdict 2>/dev/null | sed 's/^/[hvtune] /' || true
  fi
}

# The run page (`hvtune serve`) in the background when HVTUNE_PAGE_PORT is set (off by default), once per container:
# `all` starts it before caching and `train` then leaves it. It listens on every address of the container (the port
# is published by compose.page.yaml, RunPod's HTTP ports or Vast's -p), so it always requires a token:
# HVTUNE_PAGE_TOKEN, or a generated one printed in the log. It ends with the container.
hv_start_page() {
  [ -n "${HVTUNE_PAGE_PORT:-}" ] || return 0
  [ -z "${HV_PAGE_STARTED:-}" ] || return 0
  [[ "$HVTUNE_PAGE_PORT" =~ ^[1-9][0-9]*$ ]] && [ "$HVTUNE_PAGE_PORT" -le 65535 ] || \
    hv_die "HVTUNE_PAGE_PORT=$HVTUNE_PAGE_PORT is not a port number (1-65535); leave it empty to turn the run page off"
  hvtune serve "$HV_OUTPUT_DIR" --host 0.0.0.0 --port "$HVTUNE_PAGE_PORT" \
    2>&1 | sed -u 's/^/[page] /' >&2 &
  export HV_PAGE_STARTED=1
}

hv_gpu_count() {
  case "${HVTUNE_VENDOR:-cpu}" in
    cuda) nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true ;;
    rocm) compgen -G '/dev/dri/renderD*' | wc -l ;;
    *) echo 0 ;;
  esac
}

# RunPod instant clusters set PRIMARY_ADDR, PRIMARY_PORT, NODE_RANK, NUM_NODES, NUM_TRAINERS (GPUs per node) and
# WORLD_SIZE on every node (docs.runpod.io/instant-clusters): they fill accelerate's names left unset, and NCCL uses
# the cluster network (ens1; eth0 is internet only). A WORLD_SIZE / RANK in the container's own environment would make
# a single hvtune process (cache, check) take itself for one of a process group and wait for the others: no launcher
# runs above an entrypoint, and `accelerate launch` sets them for the processes it starts.
hv_machines_from_platform() {
  if [ -n "${PRIMARY_ADDR:-}" ] && [[ "${NUM_NODES:-}" =~ ^[1-9][0-9]*$ ]]; then
    : "${NUM_MACHINES:=$NUM_NODES}" "${MACHINE_RANK:=${NODE_RANK:-0}}" "${MAIN_PROCESS_IP:=$PRIMARY_ADDR}"
    : "${MAIN_PROCESS_PORT:=${PRIMARY_PORT:-29500}}" "${NCCL_SOCKET_IFNAME:=ens1}"
    if [[ "${NUM_TRAINERS:-}" =~ ^[1-9][0-9]*$ ]]; then : "${NUM_PROCESSES:=$((NUM_NODES * NUM_TRAINERS))}"; fi
    export NUM_MACHINES MACHINE_RANK MAIN_PROCESS_IP MAIN_PROCESS_PORT NCCL_SOCKET_IFNAME
    if [ -n "${NUM_PROCESSES:-}" ]; then export NUM_PROCESSES; fi
  fi
  unset WORLD_SIZE RANK LOCAL_RANK LOCAL_WORLD_SIZE
}

# Several machines (accelerate's names): a bad combination stops every entrypoint at start, before any download or
# cache build, with one line. NUM_PROCESSES counts the processes of all machines together, as accelerate does.
hv_check_machines() {
  local n=${NUM_PROCESSES:-1} machines=${NUM_MACHINES:-1} rank=${MACHINE_RANK:-0} port=${MAIN_PROCESS_PORT:-29500}
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || hv_die "NUM_PROCESSES=$n is not a positive integer"
  [[ "$machines" =~ ^[1-9][0-9]*$ ]] || hv_die "NUM_MACHINES=$machines is not a positive integer"
  [ $((n % machines)) -eq 0 ] || hv_die "NUM_PROCESSES=$n is not a multiple of NUM_MACHINES=$machines"
  [[ "$port" =~ ^[1-9][0-9]*$ ]] && [ "$port" -le 65535 ] || hv_die "MAIN_PROCESS_PORT=$port is not a port number (1-65535)"
  [[ "${HVTUNE_RENDEZVOUS_TIMEOUT:-600}" =~ ^[1-9][0-9]*$ ]] || \
    hv_die "HVTUNE_RENDEZVOUS_TIMEOUT=$HVTUNE_RENDEZVOUS_TIMEOUT is not a whole number of seconds"
  [ "$machines" -gt 1 ] || return 0
  [[ "$rank" =~ ^[0-9]+$ ]] && [ "$rank" -lt "$machines" ] || \
    hv_die "MACHINE_RANK=$rank must be between 0 and $((machines - 1)) (NUM_MACHINES=$machines): 0 on the main machine, 1.. on the others"
  [ -n "${MAIN_PROCESS_IP:-}" ] || \
    hv_die "NUM_MACHINES=$machines needs MAIN_PROCESS_IP (the address of machine rank 0, reachable from the others) on every machine"
}

# `hvtune COMMAND ARGS...`, exec'd (SIGTERM reaches it), under `accelerate launch` when NUM_PROCESSES > 1 (one process
# per GPU). SCOPE `all`: NUM_PROCESSES counts every process on every machine, as accelerate does, and all machines
# join one launch (train), after `hvtune rendezvous` found every machine within HVTUNE_RENDEZVOUS_TIMEOUT (a wrong
# address is one line, not a silent wait); torch's own rendezvous gets the same timeout. SCOPE `local`: only this
# machine's NUM_PROCESSES / NUM_MACHINES processes, launched here alone (cache: each machine builds the whole cache
# on its own disk, its processes sharing the one cache_dir).
hv_launch() {
  local scope=$1 n=${NUM_PROCESSES:-1} machines=${NUM_MACHINES:-1} per_machine timeout=${HVTUNE_RENDEZVOUS_TIMEOUT:-600}
  shift
  hv_check_machines
  per_machine=$((n / machines))
  if [ "$scope" = local ]; then n=$per_machine machines=1; fi
  if [ "$n" -le 1 ] && [ "$machines" -le 1 ]; then exec hvtune "$@"; fi
  if [ "${HVTUNE_VENDOR:-cpu}" != cpu ] && [ "${HVTUNE_SKIP_GPU_CHECK:-0}" != 1 ]; then
    local gpus
    gpus=$(hv_gpu_count)
    [ "$gpus" -ge "$per_machine" ] || \
      hv_die "NUM_PROCESSES=${NUM_PROCESSES:-1} on ${NUM_MACHINES:-1} machine(s) needs $per_machine GPU(s) here but $gpus are visible: lower NUM_PROCESSES or expose more GPUs"
  fi
  local launch=(--num_processes "$n" --num_machines "$machines" --multi_gpu --mixed_precision no --dynamo_backend no
                --main_process_port "${MAIN_PROCESS_PORT:-29500}")
  if [ "$machines" -gt 1 ]; then
    hv_log "machine $MACHINE_RANK of $machines: checking that every machine reaches ${MAIN_PROCESS_IP}:${MAIN_PROCESS_PORT:-29500} (up to $timeout s)"
    hvtune rendezvous --timeout "$timeout"
    launch+=(--machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_PROCESS_IP" --rdzv_conf "timeout=$timeout")
  fi
  hv_log "with accelerate launch: $n processes on $machines machine(s)"
  exec accelerate launch "${launch[@]}" -m hvtune "$@"
}
