"""knnlm-vdb: a nearest-neighbour language model (kNN-LM) backed by a vector database."""
from knnlm_vdb.errors import KnnlmError

__version__ = "0.1.0"
__all__ = ["KnnlmError", "__version__"]
