"""The demo: build a datastore from the bundled tutorial chapters, tune on one held-out
chapter, report base vs kNN-LM perplexity on another, continue its opening. About five minutes on
2 CPU cores (measured: 311 s), half of it the three scoring passes that search Milvus Lite."""
from __future__ import annotations

import logging
import shutil
import time
from importlib import resources
from pathlib import Path

from knnlm_vdb.api import KnnLM
from knnlm_vdb.corpus import read_documents
from knnlm_vdb.datastore import StoreInfo, create_store
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.ingest import ingest
from knnlm_vdb.lm import load_lm

log = logging.getLogger(__name__)

DEMO_CTX, DEMO_STRIDE = 512, 384  # shorter windows than the default: fewer tokens encoded twice
DEMO_PROMPT_TOKENS, DEMO_NEW_TOKENS = 48, 24  # a greedy completion of the test chapter's opening
DEMO_MAX_K = 128  # Milvus Lite returns large top-k slowly (seconds per 512 queries at k=1024)


def sample_file(name: str) -> Path:
    return Path(str(resources.files("knnlm_vdb") / "data" / name))


def run_demo(workdir: Path, backend: str = "milvus", model: str = "smollm2-135m", show_progress: bool = True) -> dict:
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    encoder = Encoder(load_lm(model), ctx=DEMO_CTX, stride=DEMO_STRIDE, batch_size=2)
    info = StoreInfo.for_encoder(encoder)
    if backend == "faiss":
        location = workdir / "faiss-demo"
        shutil.rmtree(location, ignore_errors=True)
        store = create_store("faiss", str(location), info)
    else:
        location = workdir / "knnlm-demo.db"
        from knnlm_vdb.datastore.milvus.catalog import drop_domain

        if location.exists():  # start from scratch: the demo's numbers are for this sample alone
            drop_domain(str(location), "demo")
        store = create_store("milvus", str(location), info, domain="demo", index_type="HNSW",
                             index_params={"M": 16, "efConstruction": 200}, search_params={"ef": DEMO_MAX_K})
    train = sample_file("demo_train.jsonl")
    ingest(encoder, store, read_documents(train), domain="demo", show_progress=show_progress)

    def token_ids(name):
        return [encoder.tokenize(d.text) for d in read_documents(sample_file(name))]

    with KnnLM(encoder, [store]) as lm:  # tune stores k, T, λ and the --lambda auto calibration with the domain
        tuned = lm.tune(token_ids("demo_valid.jsonl"), max_k=DEMO_MAX_K, show_progress=show_progress)
        best = tuned["best"]
        test_ids = token_ids("demo_test.jsonl")
        test = lm.evaluate(test_ids, show_progress=show_progress, k=best["k"], temperature=best["temperature"],
                           lmbda=best["lambda"]).to_dict()
        auto = lm.evaluate(test_ids, show_progress=show_progress, lmbda="auto").to_dict()  # + the in-document cache
        no_cache = lm.evaluate(test_ids, show_progress=show_progress, lmbda="auto", cache=False).to_dict()
        prompt = encoder.lm.tokenizer.decode(test_ids[0][:DEMO_PROMPT_TOKENS])
        completions = {name: lm.generate(prompt, max_new_tokens=DEMO_NEW_TOKENS, lmbda=lam).text
                       for name, lam in (("base", 0.0), ("auto", "auto"))}
        entries = store.count()
    return {**test, "auto_knnlm_ppl": auto["knnlm_ppl"], "auto_searched_fraction": auto["searched_fraction"],
            "auto_no_cache_knnlm_ppl": no_cache["knnlm_ppl"],
            "backend": backend, "datastore": str(location), "datastore_entries": entries,
            "train_file": train.name, "valid_tokens": tuned["tokens"],
            "prompt": prompt, "completions": completions, "seconds": time.perf_counter() - t0}
