# Container targets; the top Makefile includes this file (`include docker/docker.mk`).
#   make build-cuda | build-cuda12 | build-rocm | build-cpu   build an image (compose build of the `cache` service of that profile)
#   make cache | train                         docker compose up cache / train: exit 0 when it finished, 2 when anything
#                                              failed (make's code; the log names the service and its one-line reason).
#                                              Builds a missing image locally, never pulls it (pull_policy: never).
#                                              (vendor: COMPOSE_PROFILES, from the shell or .env; cpu: fetches the wheel)
#   make pin                                   resolve every vendor's base image digest (online) into
#                                              docker/compose.vendors.yaml and the Dockerfile's default
#   make lock                                  regenerate docker/requirements-*.lock (hashed) from pyproject.toml and the
#                                              torch indexes (online)
#   make lint-docker                           hadolint + shellcheck (also run by `make lint`)
#   make engine                                CI: Docker engine + compose v2 + local Debian base (docker/ci-engine.sh)
#   make container-test                        static container tests + the real end-to-end test (needs an engine)
VENV ?= .venv
COMPOSE ?= docker compose
TORCH_VERSION := $(shell sed -n 's/^x-torch-version: &torch-version "\(.*\)"/\1/p' docker/compose.vendors.yaml)
TORCH_CPU_WHEEL := docker/wheels/torch-$(TORCH_VERSION)+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
# where build-cpu looks for the cpu torch wheel when docker/wheels/ lacks it (a directory or a pip index URL)
TORCH_CPU_WHEEL_SOURCE ?= $(if $(wildcard /opt/wheels/torch-$(TORCH_VERSION)+cpu-cp311-*.whl),/opt/wheels,https://download.pytorch.org/whl/cpu)

.PHONY: build-cuda build-cuda12 build-rocm build-cpu cache train pin lock lint-docker engine container-test

build-cuda:
	COMPOSE_PROFILES=cuda $(COMPOSE) build cache

# older drivers (>= 525.60.13): needs download.pytorch.org (not reachable from CI machines); see docs/CONTAINERS.md
build-cuda12:
	COMPOSE_PROFILES=cuda12 $(COMPOSE) build cache

build-rocm:
	COMPOSE_PROFILES=rocm $(COMPOSE) build cache

build-cpu: $(TORCH_CPU_WHEEL)
	COMPOSE_PROFILES=cpu $(COMPOSE) build cache

# the cpu image installs torch from docker/wheels/ (gitignored) so that it builds where download.pytorch.org is not
# reachable from inside containers
$(TORCH_CPU_WHEEL):
	mkdir -p docker/wheels
	if [ -d "$(TORCH_CPU_WHEEL_SOURCE)" ]; then cp "$(TORCH_CPU_WHEEL_SOURCE)/$(notdir $@)" $@; \
	else python3 -m pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
	  --index-url "$(TORCH_CPU_WHEEL_SOURCE)" -d docker/wheels "torch==$(TORCH_VERSION)+cpu"; fi

# the vendor compose will use: COMPOSE_PROFILES from the shell, else from .env; the cpu image needs its torch wheel
PROFILE := $(or $(COMPOSE_PROFILES),$(shell sed -n 's/^COMPOSE_PROFILES=//p' .env 2>/dev/null | tail -n 1),cuda)
IMAGE_INPUTS := $(if $(filter cpu,$(PROFILE)),$(TORCH_CPU_WHEEL))

# A bare `docker compose up train` exits 0 when train fails. --abort-on-container-failure makes `up` fail when a service
# fails (train's own code; 1 when cache failed, compose's "dependency failed to start") and does not stop train when
# cache exits 0; --attach-dependencies shows cache's log too. make turns any failure into 2, the code the docs give.
# README.md and docs/CONTAINERS.md document this same invocation (tests/test_container_runtime.py runs it).
cache: $(IMAGE_INPUTS)
	$(COMPOSE) up --abort-on-container-failure cache

train: $(IMAGE_INPUTS)
	$(COMPOSE) up --abort-on-container-failure --attach-dependencies train

pin:
	docker/pin.sh

lock:
	docker/lock.sh

lint: lint-docker
lint-docker: $(STAMP)
	$(VENV)/bin/hadolint docker/Dockerfile
	$(VENV)/bin/shellcheck -x entrypoints/all entrypoints/cache entrypoints/train entrypoints/fetch-encoders entrypoints/lib.sh \
	  entrypoints/driver-check.sh docker/*.sh

engine:
	docker/ci-engine.sh

container-test:
	$(VENV)/bin/python -m pytest -q -rs tests/test_container_static.py tests/test_container_pins.py tests/test_container.py \
	  tests/test_container_runtime.py tests/test_container_fresh_box.py
