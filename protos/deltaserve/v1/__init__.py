"""Generated gRPC stubs of the public API (package ``deltaserve.v1``).

The ``*_pb2*.py`` modules are generated from ``deltaserve.proto`` by ``make protos``
(grpcio-tools) and are not committed.
"""
