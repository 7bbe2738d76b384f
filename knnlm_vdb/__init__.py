"""knnlm-vdb: a nearest-neighbour language model (kNN-LM) backed by a vector database.

``from knnlm_vdb import KnnLM`` is the Python API (see ``knnlm_vdb.api``); it is imported on
first use, so that the gRPC client (``knnlm_vdb.service.client``) needs neither torch nor
transformers.
"""
from knnlm_vdb.errors import BackendUnavailable, Incompatible, InvalidInput, KnnlmError, NotFound

__version__ = "0.1.0"
__all__ = ["KnnLM", "KnnlmError", "InvalidInput", "NotFound", "Incompatible", "BackendUnavailable", "__version__"]


def __getattr__(name):
    if name == "KnnLM":
        from knnlm_vdb.api import KnnLM

        return KnnLM
    raise AttributeError(f"module 'knnlm_vdb' has no attribute {name!r}")
