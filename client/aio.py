"""asyncio gRPC client (``grpc.aio``); same methods as :class:`deltaserve.client.sync.DeltaClient`.

async with AsyncDeltaClient("127.0.0.1:50051") as client:
    out = await client.generate("Describe the image.", image=png_bytes, chat=True)
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from deltaserve.client.common import (
    CHANNEL_OPTIONS,
    DEFAULT_SERVER,
    Generation,
    register_chunks,
    client_error,
    generate_request,
    metadata,
)
from deltaserve.v1 import deltaserve_pb2 as pb
from deltaserve.v1 import deltaserve_pb2_grpc as pb_grpc


class AsyncDeltaClient:
    def __init__(self, server: str = DEFAULT_SERVER, *, admin_token: str | None = None, timeout: float | None = 300.0):
        self.channel = grpc.aio.insecure_channel(server, options=CHANNEL_OPTIONS)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.registry = pb_grpc.RegistryStub(self.channel)
        self.admin_token = admin_token
        self.timeout = timeout

    async def generate(self, prompt: str, **kwargs) -> Generation:
        try:
            return Generation.from_pb(
                await self.inference.Generate(generate_request(prompt, **kwargs), timeout=self.timeout)
            )
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    async def generate_stream(self, prompt: str, **kwargs) -> AsyncIterator[pb.GenerateChunk]:
        try:
            async for chunk in self.inference.GenerateStream(generate_request(prompt, **kwargs), timeout=self.timeout):
                yield chunk
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    async def register(self, bundle_dir, name: str | None = None) -> pb.DeltaInfo:
        try:
            return await self.registry.RegisterStream(
                register_chunks(bundle_dir, name),
                timeout=self.timeout,
                metadata=metadata(self.admin_token),
            )
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    async def unregister(self, name: str) -> None:
        try:
            await self.registry.Unregister(
                pb.UnregisterRequest(name=name), timeout=self.timeout, metadata=metadata(self.admin_token)
            )
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    async def list(self) -> pb.ListResponse:
        try:
            return await self.registry.List(pb.ListRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    async def get(self, name: str) -> pb.DeltaInfo:
        try:
            return await self.registry.Get(pb.GetRequest(name=name), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncDeltaClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
