"""The gRPC service: ``knnlm-vdb serve`` (server), ``KnnlmClient`` and ``knnlm-vdb score --server``.

Modules: ``knnlm.proto`` (the API, package ``knnlm.v1``), ``scoring`` (the kNN-LM for a batch
of requests), ``batcher`` (grouping concurrent requests), ``server`` (servicer, health,
reflection, limits, shutdown), ``security`` (TLS, tokens), ``client``, ``commands``.

The stubs ``knnlm_pb2.py``, ``knnlm_pb2.pyi`` and ``knnlm_pb2_grpc.py`` are generated and
committed; after editing ``knnlm.proto``, regenerate them from the repository root with

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \\
        knnlm_vdb/service/knnlm.proto

(run from the root so that the generated import is ``from knnlm_vdb.service import knnlm_pb2``).
tests/test_service.py regenerates them into a temporary directory and fails if the committed
files differ. The generated code checks its runtime: it needs grpcio >= the grpcio-tools
version and protobuf >= the protobuf version that generated it (see the files' headers).
"""
