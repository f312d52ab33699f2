# Every target sets up what it needs: a fresh clone runs `make run` or `make test` directly.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MHA := $(VENV)/bin/mha
REPO ?= models
STAMP := $(VENV)/.installed

.PHONY: venv run export test lint fmt proto fuzz bench-export bench-serve bench-decode bench-memory \
	bench-flood bench-soak image images smoke kube-smoke clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[cpu,export,dev]"
	touch $(STAMP)

venv: $(STAMP)

# The main job on the embedded default model.
run: $(STAMP)
	$(MHA) export --repository $(REPO) --if-missing
	$(MHA) serve --repository $(REPO)

export: $(STAMP)
	$(MHA) export --repository $(REPO)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy model export service

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(VENV)/bin/pytest -q

proto: $(STAMP)
	$(PY) -m mha.service.grpc.protogen

# Random requests against a real server for FUZZ_MINUTES (tests/service/fuzz_long.py); the
# short, derandomized form runs in `make test` (tests/service/test_fuzz.py).
FUZZ_MINUTES ?= 5
fuzz: $(STAMP)
	$(PY) tests/service/fuzz_long.py --minutes $(FUZZ_MINUTES)

bench-export: $(STAMP)
	$(MHA) bench export --out bench-out/export

bench-serve: $(STAMP)
	$(MHA) bench serve --out bench-out/serve

bench-decode: $(STAMP)
	$(MHA) bench decode --out bench-out/decode

bench-memory: $(STAMP)
	$(MHA) bench memory --out bench-out/memory

bench-flood: $(STAMP)
	$(MHA) bench flood --out bench-out/flood

bench-soak: $(STAMP)
	$(MHA) bench soak --out bench-out/soak

clean:
	rm -rf $(VENV) bench-out .pytest_cache .mypy_cache .ruff_cache

# The CPU serving image (podman + runc; a base made with mmdebstrap when none can be pulled).
image:
	bash deploy/image.sh

# Both images the cpu overlay runs: the server's and the model image (whose build exports).
images: image
	IMAGE=mha-models:latest DOCKERFILE=deploy/Dockerfile.models bash deploy/image.sh

# Build the image, run it read-only as non-root, health check + one inference (deploy/README.md).
smoke: $(STAMP)
	VENV=$(VENV) bash deploy/smoke.sh

# The cpu overlay's pod under `podman kube play`: init container, then the server (deploy/README.md).
kube-smoke: $(STAMP)
	VENV=$(VENV) bash deploy/kube_smoke.sh
