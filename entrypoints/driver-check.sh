# shellcheck shell=bash
# Host driver floor of this image, checked before anything runs (sourced by lib.sh's hv_check_gpu).
#
# The CUDA runtime inside the image (torch's nvidia-* wheels) runs on a host driver at least as new as its minor-version
# compatibility floor; below it torch only reports "CUDA driver version is insufficient" deep inside the first step.
# docs/CONTAINERS.md ("Driver floors") explains the numbers; tests/test_container_cuda.py runs this file on fake
# version files. Paths are overridable for those tests: HVTUNE_NVIDIA_VERSION_FILE, HVTUNE_KFD_PATH.
#
#   tag     CUDA   minimum Linux driver (every GPU family: GeForce, RTX/Quadro, datacenter)
HV_CUDA_FLOORS=(
  "cuda   13.0 580.65.06"
  "cuda12 12.6 525.60.13"
)

# The host driver version: /proc/driver/nvidia/version (the kernel module; visible in every container on an NVIDIA
# host), else nvidia-smi (mounted by the container toolkit). Empty when neither says.
hv_nvidia_driver_version() {
  local file=${HVTUNE_NVIDIA_VERSION_FILE:-/proc/driver/nvidia/version} version=""
  if [ -r "$file" ]; then
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 ..." (or "... Open Kernel Module for x86_64")
    version=$(sed -n 's/^NVRM version:.*[[:space:]]\([0-9]\{3,\}\.[0-9]\{1,3\}\(\.[0-9]\{1,3\}\)\{0,1\}\)[[:space:]].*/\1/p' "$file" | head -n1)
  fi
  if [ -z "$version" ] && command -v nvidia-smi >/dev/null 2>&1; then
    version=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 | tr -d '[:space:]')
  fi
  [[ "$version" =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]] || version="" # anything else is no version we can compare
  printf '%s' "$version"
}

# true when version $1 >= $2 (dotted numbers)
hv_version_at_least() {
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

hv_check_driver() {
  case "${HVTUNE_VENDOR:-cpu}" in
    cuda) hv_check_nvidia_driver ;;
    rocm) hv_check_kfd ;;
  esac
}

hv_check_nvidia_driver() {
  local tag=${HVTUNE_IMAGE_TAG:-cuda} found row name cuda floor need="" need_cuda="" advice=""
  found=$(hv_nvidia_driver_version)
  [ -n "$found" ] || return 0 # no driver at all: hv_check_gpu says "no NVIDIA GPU visible"
  for row in "${HV_CUDA_FLOORS[@]}"; do
    read -r name cuda floor <<<"$row"
    if [ "$name" = "$tag" ]; then need=$floor; need_cuda=$cuda; fi
  done
  [ -n "$need" ] || return 0 # an image without a CUDA runtime of its own (cpu): no floor to hold the driver to
  hv_version_at_least "$found" "$need" && return 0
  # the newest other tag this driver can run
  for row in "${HV_CUDA_FLOORS[@]}"; do
    read -r name cuda floor <<<"$row"
    if [ -z "$advice" ] && [ "$name" != "$tag" ] && hv_version_at_least "$found" "$floor"; then
      advice="use the hvtune:$name image (CUDA $cuda, driver >= $floor; compose: COMPOSE_PROFILES=$name) or update the host driver"
    fi
  done
  : "${advice:=update the host driver to >= $need (no hvtune image supports $found)}"
  hv_die "NVIDIA driver $found is too old for the hvtune:$tag image (CUDA $need_cuda needs driver >= $need): $advice"
}

hv_check_kfd() {
  local kfd=${HVTUNE_KFD_PATH:-/dev/kfd}
  if [ ! -e "$kfd" ]; then
    hv_die "no AMD GPU visible in the container ($kfd missing): the host needs the amdgpu driver (ROCm 7.2: AMD GPU Driver 30.10 or newer) and the container --device /dev/kfd --device /dev/dri (compose: profile rocm)"
  fi
}
