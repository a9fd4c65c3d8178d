"""Synchronous gRPC client.

from deltaserve.client.sync import DeltaClient
with DeltaClient("127.0.0.1:50051") as client:
    out = client.generate("What digit is shown?", image="digit.png", chat=True)
    print(out.text, out.routing.expert)
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from deltaserve.client.common import (
    CHANNEL_OPTIONS,
    DEFAULT_SERVER,
    Generation,
    Routing,
    register_chunks,
    client_error,
    generate_request,
    metadata,
)
from deltaserve.v1 import deltaserve_pb2 as pb
from deltaserve.v1 import deltaserve_pb2_grpc as pb_grpc


class DeltaClient:
    def __init__(self, server: str = DEFAULT_SERVER, *, admin_token: str | None = None, timeout: float | None = 300.0):
        self.channel = grpc.insecure_channel(server, options=CHANNEL_OPTIONS)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.registry = pb_grpc.RegistryStub(self.channel)
        self.admin_token = admin_token
        self.timeout = timeout

    def generate(self, prompt: str, **kwargs) -> Generation:
        """Keyword arguments as :func:`deltaserve.client.common.generate_request`."""
        try:
            return Generation.from_pb(self.inference.Generate(generate_request(prompt, **kwargs), timeout=self.timeout))
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    def generate_stream(self, prompt: str, **kwargs) -> Iterator[pb.GenerateChunk]:
        """Chunks as they are generated; the first carries ``routing``, the last ``finish_reason`` and ``usage``."""
        try:
            yield from self.inference.GenerateStream(generate_request(prompt, **kwargs), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    def route(self, prompt: str, **kwargs) -> Routing:
        """The routing decision for a request, without generating (keyword arguments as ``generate``)."""
        try:
            return Routing.from_pb(self.inference.Route(generate_request(prompt, **kwargs), timeout=self.timeout))
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    def register(self, bundle_dir, name: str | None = None) -> pb.DeltaInfo:
        try:
            return self.registry.RegisterStream(
                register_chunks(bundle_dir, name),
                timeout=self.timeout,
                metadata=metadata(self.admin_token),
            )
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    def unregister(self, name: str) -> None:
        try:
            self.registry.Unregister(
                pb.UnregisterRequest(name=name), timeout=self.timeout, metadata=metadata(self.admin_token)
            )
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    def list(self) -> pb.ListResponse:
        try:
            return self.registry.List(pb.ListRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    def get(self, name: str) -> pb.DeltaInfo:
        try:
            return self.registry.Get(pb.GetRequest(name=name), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DeltaClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
