"""KServe's OIP v2 gRPC API (`grpc_predict_v2.proto`, package `inference`) and its stubs.

The `*_pb2*.py` files are generated; regenerate from the repository root with

    .venv/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \
        --grpc_python_out=. serving/gateway/proto/grpc_predict_v2.proto
    sed -i 's/_descriptor_pool.Default()/_descriptor_pool.DescriptorPool()/' \
        serving/gateway/proto/grpc_predict_v2_pb2.py

The sed puts our messages in a descriptor pool of their own: tritonclient.grpc (and
KServe's client) register the same `inference.*` names in protobuf's default pool, and a
second file defining them there fails to import ("duplicate symbol"), so a process (a test)
could not load both. The wire format names no messages, so nothing else changes.
"""
