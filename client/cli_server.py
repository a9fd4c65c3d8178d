"""``deltaserve serve`` and the commands that talk to a running server (gRPC, and HTTP for metrics)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from deltaserve.client.common import DEFAULT_SERVER, DeltaClientError, Routing
from deltaserve.plugins import env

_server_option = click.option(
    "--server",
    default=lambda: env.server_address() or DEFAULT_SERVER,
    show_default="DELTASERVE_SERVER or 127.0.0.1:50051",
    help="gRPC address of the server.",
)
_token_option = click.option(
    "--admin-token",
    default=lambda: env.admin_token(),
    show_default="DELTASERVE_ADMIN_TOKEN",
    help="Admin token for registry mutations.",
)


def _fail(exc: DeltaClientError) -> None:
    raise click.ClickException(str(exc))


@click.command()
@click.option(
    "--base",
    "base_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Base model directory.",
)
@click.option(
    "--store", required=True, type=click.Path(file_okay=False, path_type=Path), help="Delta store directory (created)."
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--grpc-port", default=50051, show_default=True, help="0 picks a free port.")
@click.option("--http-port", default=8000, show_default=True, help="0 picks a free port.")
@click.option(
    "--admin-token",
    default=lambda: env.admin_token(),
    help="Require this bearer token for registry mutations (env DELTASERVE_ADMIN_TOKEN).",
)
@click.option(
    "--served-model-name", default=None, help="Name of the base model for clients (default: the directory name)."
)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--max-model-len", type=int, default=None, help="Context length (default: the model's).")
@click.option("--max-num-seqs", default=64, show_default=True, help="Most sequences per engine step.")
@click.option("--max-loras", default=4, show_default=True, help="Distinct LoRA deltas in one batch.")
@click.option("--max-lora-rank", default=16, show_default=True)
@click.option("--max-cpu-loras", type=int, default=None, help="LoRA deltas kept loaded (default max(max-loras, 16)).")
@click.option(
    "--kv-cache-memory-bytes",
    type=int,
    default=512 * 1024 * 1024,
    show_default=True,
    help="KV cache size; 0 = size by --gpu-memory-utilization.",
)
@click.option(
    "--gpu-memory-utilization",
    default=0.4,
    show_default=True,
    help="Memory fraction for vLLM when the KV cache is not sized explicitly.",
)
@click.option("--enforce-eager", is_flag=True, help="Disable torch.compile in vLLM.")
@click.option(
    "--tensor-parallel-size",
    default=1,
    show_default=True,
    help="Shard the model over N workers (vLLM tensor parallelism; on CPU one core group per worker).",
)
@click.option(
    "--engine-spin-ms",
    type=click.FloatRange(min=0),
    default=None,
    help="How long the engine processes busy-wait for each other before sleeping (default: 1 on CPU, "
    "vLLM's 1000 on GPU).",
)
@click.option(
    "--replicas",
    default=0,
    show_default=True,
    help="N >= 1: N engine replicas on Ray Serve behind one HTTP ingress, delta-affine (needs the `ray` extra); "
    "0: one engine in this process.",
)
@click.option(
    "--max-deltas-per-replica",
    default=8,
    show_default=True,
    help="With --replicas: deltas an engine replica keeps bound (least recently used evicted).",
)
@click.option(
    "--store-url",
    default=None,
    help="With --replicas: publish the store to an S3-compatible bucket (s3://bucket/prefix; endpoint and "
    "credentials from the AWS_* environment) for replicas without shared storage (needs the `s3` extra).",
)
@click.option("--no-lora", is_flag=True, help="Serve without multi-LoRA (then vLLM compiles the decoder on CPU).")
@click.option(
    "--no-exclusive",
    is_flag=True,
    help="Do not load the worker extension (no sparse, bottleneck or other plan deltas).",
)
@click.option(
    "--concurrent-delta-budget",
    type=float,
    default=256,
    show_default=True,
    help="MiB a plan delta may hold in the engine and still share the batch; larger ones get an exclusive state.",
)
@click.option(
    "--max-bundle-size",
    type=click.FloatRange(min=0, min_open=True),
    default=512,
    show_default=True,
    help="Largest delta bundle (MiB, all files) a registration may bring.",
)
@click.option(
    "--router",
    default="auto",
    show_default=True,
    help="Router for requests without a task (entry point group deltaserve.routers).",
)
@click.option(
    "--router-opt", multiple=True, metavar="KEY=VALUE", help="Router option, e.g. threshold=0.5 (repeatable)."
)
@click.option(
    "--max-state-wait",
    type=float,
    default=2.0,
    show_default=True,
    help="Fairness bound (s) of the engine-state scheduler.",
)
@click.option(
    "--state-batch-wait",
    type=float,
    default=0.05,
    show_default=True,
    help="Wait (s) for more requests before switching into an exclusive state.",
)
@click.option(
    "--grace-period",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds in-flight requests may take to finish on SIGTERM.",
)
@click.option("--default-max-tokens", default=64, show_default=True)
@click.option("--max-image-pixels", default=4096 * 4096, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--log-level", default="INFO", show_default=True)
def serve(
    base_dir,
    store,
    host,
    grpc_port,
    http_port,
    admin_token,
    served_model_name,
    dtype,
    max_model_len,
    max_num_seqs,
    max_loras,
    max_lora_rank,
    max_cpu_loras,
    kv_cache_memory_bytes,
    gpu_memory_utilization,
    enforce_eager,
    no_lora,
    no_exclusive,
    concurrent_delta_budget,
    max_bundle_size,
    tensor_parallel_size,
    engine_spin_ms,
    replicas,
    max_deltas_per_replica,
    store_url,
    router,
    router_opt,
    max_state_wait,
    state_batch_wait,
    grace_period,
    default_max_tokens,
    max_image_pixels,
    seed,
    log_level,
) -> None:
    """Start the server: vLLM engine + gRPC + OpenAI-compatible HTTP (--replicas N: N engines on Ray Serve)."""
    import asyncio
    import logging

    from deltaserve.server.app import serve as run_server
    from deltaserve.server.config import EngineConfig, ServeConfig

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    extra = {"max_state_wait_s": max_state_wait, "state_batch_wait_s": state_batch_wait}
    for item in router_opt:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.UsageError(f"--router-opt {item!r} is not KEY=VALUE")
        extra[f"router.{key}"] = value
    engine = EngineConfig(
        model=str(base_dir),
        served_model_name=served_model_name,
        dtype=dtype,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        enable_lora=not no_lora,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        max_cpu_loras=max_cpu_loras,
        kv_cache_memory_bytes=kv_cache_memory_bytes or None,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        seed=seed,
        exclusive_deltas=not no_exclusive,
        concurrent_delta_budget_bytes=int(concurrent_delta_budget * 1024 * 1024),
        tensor_parallel_size=tensor_parallel_size,
        engine_spin_ms=engine_spin_ms,
    )
    config = ServeConfig(
        engine=engine,
        store=store,
        store_url=store_url,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        admin_token=admin_token or None,
        grace_period_s=grace_period,
        default_max_tokens=default_max_tokens,
        max_image_pixels=max_image_pixels,
        max_bundle_bytes=int(max_bundle_size * 1024 * 1024),
        router=router,
        extra=extra,
    )
    if replicas < 0 or max_deltas_per_replica < 1:
        raise click.UsageError("--replicas must be >= 0 and --max-deltas-per-replica >= 1")
    if store_url is not None:
        if not replicas:
            raise click.UsageError("--store-url is for engine replicas (--replicas N): one server reads --store")
        from deltaserve.server.object_store import parse_url

        try:
            parse_url(store_url)
            import boto3  # noqa: F401
        except ValueError as exc:
            raise click.UsageError(f"--store-url: {exc}") from None
        except ImportError as exc:
            raise click.ClickException(f"--store-url needs boto3: pip install 'deltaserve[s3]' ({exc})") from None
    if replicas:
        try:
            import ray.serve  # noqa: F401
        except ImportError as exc:
            raise click.ClickException(f"--replicas needs Ray Serve: pip install 'deltaserve[ray]' ({exc})") from None
        from deltaserve.server import deploy_ray

        deploy_ray.run(config, replicas, max_deltas_per_replica=max_deltas_per_replica)
        return
    asyncio.run(run_server(config))


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_server_option
@click.option("--name", default=None, help="Register under this name (required for a plain PEFT adapter directory).")
@_token_option
def register(bundle: Path, server: str, name: str | None, admin_token: str | None) -> None:
    """Register a delta bundle (or a PEFT adapter directory) with a running server."""
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(server, admin_token=admin_token) as client:
        try:
            info = client.register(bundle, name=name)
        except DeltaClientError as exc:
            _fail(exc)
    click.echo(f"registered {info.name} ({info.kind}, {info.binding}) {info.content_digest[:19]}")


@click.command()
@click.argument("name")
@_server_option
@_token_option
def unregister(name: str, server: str, admin_token: str | None) -> None:
    """Remove a registered delta from a running server."""
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(server, admin_token=admin_token) as client:
        try:
            client.unregister(name)
        except DeltaClientError as exc:
            _fail(exc)
    click.echo(f"unregistered {name}")


@click.command("list")
@_server_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(server: str, as_json: bool) -> None:
    """List the base model and the registered deltas."""
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(server) as client:
        try:
            listing = client.list()
        except DeltaClientError as exc:
            _fail(exc)
    rows = [
        {
            "name": d.name,
            "kind": d.kind,
            "binding": d.binding,
            "digest": d.content_digest[:19],
            "description": d.description,
        }
        for d in listing.deltas
    ]
    if as_json:
        click.echo(json.dumps({"base_model": listing.base_model, "deltas": rows}, indent=2))
        return
    click.echo(f"base model: {listing.base_model}")
    for r in rows:
        click.echo(f"  {r['name']:<24} {r['kind']:<11} {r['binding']:<11} {r['digest']}  {r['description']}")


@click.command()
@click.argument("prompt")
@_server_option
@click.option("--task", default="auto", show_default=True, help="Task name, the base model's name, or auto.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--max-tokens", type=int, default=None)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--raw", is_flag=True, help="Send the prompt as is (no chat template).")
def generate(
    prompt: str, server: str, task: str, image: Path | None, max_tokens: int | None, temperature: float, raw: bool
) -> None:
    """Generate from a prompt (and an image), streaming the answer to the terminal."""
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(server) as client:
        try:
            for chunk in client.generate_stream(
                prompt, image=image, task=task, max_tokens=max_tokens, temperature=temperature, chat=not raw
            ):
                if chunk.HasField("routing"):
                    click.echo(Routing.from_pb(chunk.routing).describe(), err=True)
                click.echo(chunk.text, nl=False)
                sys.stdout.flush()
                if chunk.finish_reason:
                    click.echo()
                    click.echo(f"[finish: {chunk.finish_reason}, {chunk.usage.completion_tokens} tokens]", err=True)
        except DeltaClientError as exc:
            _fail(exc)


@click.command()
@click.argument("prompt")
@_server_option
@click.option("--task", default="auto", show_default=True, help="Task name, the base model's name, or auto.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def route(prompt: str, server: str, task: str, image: Path | None, as_json: bool) -> None:
    """Show where a running server would route a prompt (and an image), and why, without generating."""
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(server) as client:
        try:
            decision = client.route(prompt, image=image, task=task, chat=True)
        except DeltaClientError as exc:
            _fail(exc)
    click.echo(json.dumps(decision.__dict__, indent=2) if as_json else decision.describe())


@click.command()
@click.option(
    "--http",
    "http_url",
    default=lambda: env.http_address() or "http://127.0.0.1:8000",
    show_default="DELTASERVE_HTTP or http://127.0.0.1:8000",
)
@click.option("--raw", is_flag=True, help="Print the Prometheus exposition as is.")
def metrics(http_url: str, raw: bool) -> None:
    """A readable summary of the server's Prometheus metrics."""
    import urllib.request

    from deltaserve.client.metrics_summary import summarize

    with urllib.request.urlopen(f"{http_url.rstrip('/')}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    click.echo(text if raw else summarize(text))
