"""``deltaserve demo``: the whole story on the embedded default, end to end.

1. the tiny LLaVA base, pretrained on the synthetic world's general tasks (cached);
2. one delta per tuning paradigm on the world's downstream tasks (cached):
   SPIDER → ``sparse`` (digits), LoRA → ``lora`` (relations), bottleneck adapter →
   ``bottleneck`` (digits);
3. ``deltaserve serve`` in a child process; the deltas registered with
   ``deltaserve register`` (the CLI, as a user would);
4. requests with images over gRPC (the Python client) and over HTTP (the official
   ``openai`` client): the base's answer beside each expert's, and what the ``auto``
   router picks;
5. a metrics summary, then SIGTERM and a clean shutdown.

Any failure stops the demo with a message naming the step and a non-zero exit.
``--tiny`` runs the same path on a tiny world and a few training steps (the
end-to-end test uses it; the answers are then mostly noise).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import click

from deltaserve.tuning.pretrain import PretrainConfig
from deltaserve.tuning.world import WorldConfig

ADMIN_TOKEN_ENV = "DELTASERVE_ADMIN_TOKEN"
BASE_NAME = "tiny-llava"


@dataclass(frozen=True)
class Expert:
    name: str
    task: str
    method: str


EXPERTS = (
    Expert("digits-spider", "digits", "spider"),
    Expert("relations-lora", "relations", "lora"),
    Expert("digits-bottleneck", "digits", "bottleneck"),
)


@dataclass(frozen=True)
class DemoConfig:
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    tune_steps: int = 500
    """The benchmark's budget (``TuneConfig.steps``); 300 left the digits experts at chance. A fresh
    `make demo` measured 13–14 min on 2 cores with it (install ≈ 3 min, pretraining ≈ 8 min)."""
    eval_limit: int | None = 100
    """Test samples per task scored when tuning (the figures shown beside each expert)."""
    questions: int = 3
    """Test questions shown per expert."""
    max_tokens: int = 8


TINY = DemoConfig(
    pretrain=PretrainConfig(
        steps=20, batch_size=8, warmup_steps=2, world=WorldConfig(general_train=24, downstream_train=24, val=4, test=6)
    ),
    tune_steps=4,
    eval_limit=4,
    questions=2,
    max_tokens=4,
)


class DemoError(click.ClickException):
    def __init__(self, step: str, message: str):
        super().__init__(f"demo failed at step `{step}`: {message}")


def _step(title: str) -> None:
    click.secho(f"\n== {title}", bold=True)


def _run_cli(*args: str, env: dict | None = None) -> str:
    """Run ``deltaserve …`` as a user would; return stdout or raise with its stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "deltaserve.client.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"`deltaserve {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout.strip()


def _data_url(path: Path) -> str:
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _cell(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def run_demo(config: DemoConfig, workdir: Path) -> dict:
    """Run the demo; returns what it showed (the end-to-end test checks it)."""
    from deltaserve.client.metrics_summary import summarize
    from deltaserve.client.process import ServerProcess
    from deltaserve.client.sync import DeltaClient
    from deltaserve.tuning import data
    from deltaserve.tuning.pretrain import pretrain
    from deltaserve.tuning.tune import TuneConfig, cached_delta
    from deltaserve.tuning.world import GENERAL_TASKS, cached_world

    shown: dict = {"experts": {}, "http": {}}
    started = time.perf_counter()

    step = "base"
    _step(
        "1/5 the base model: tiny LLaVA (CLIP vision tower + projector + Llama decoder), pretrained on the general tasks"
    )
    try:
        base = pretrain(config.pretrain, progress=True)
    except Exception as exc:
        raise DemoError(step, str(exc)) from exc
    click.echo(
        f"{base.path}  ({'cached' if base.cached else 'trained now'}; general score {base.meta['general_score']:.2f} on {', '.join(GENERAL_TASKS)})"
    )

    step = "tune"
    _step("2/5 one delta per tuning paradigm, on tasks the base never saw")
    world = cached_world(config.pretrain.world)
    bundles = {}
    try:
        for expert in EXPERTS:
            t = time.perf_counter()
            tune_config = TuneConfig(steps=config.tune_steps, eval_limit=config.eval_limit)
            bundle = cached_delta(
                base.path,
                world / expert.task,
                expert.method,
                config=tune_config,
                name=expert.name,
                general_dir=world,
                progress=True,
            )
            manifest = json.loads((bundle / "delta.json").read_text())
            m = manifest["task"]["metrics"]
            click.echo(
                f"{expert.name:<18} {expert.method:<10} → {manifest['kind']:<10} target {m.get('target', float('nan')):.2f}  "
                f"general {m.get('general', float('nan')):.2f}  ({time.perf_counter() - t:.0f} s)"
            )
            bundles[expert.name] = bundle
    except Exception as exc:
        raise DemoError(step, str(exc)) from exc

    step = "serve"
    _step("3/5 `deltaserve serve`, then `deltaserve register` for each delta (hot, no restart)")
    token = os.environ.get(ADMIN_TOKEN_ENV) or "demo-admin-token"
    workdir.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        t = time.perf_counter()
        server = ServerProcess(
            base.path, workdir / "store", "--served-model-name", BASE_NAME, "--kv-cache-memory-bytes", str(256 * 1024 * 1024),
            admin_token=token, log_path=workdir / "server.log",
        )  # fmt: skip
        click.echo(
            f"server ready in {time.perf_counter() - t:.0f} s: grpc {server.grpc}, http {server.http} (log: {server.log_path})"
        )
        step = "register"
        for name, bundle in bundles.items():
            click.echo(
                "$ deltaserve register "
                + _run_cli("register", str(bundle), "--server", server.grpc, env={ADMIN_TOKEN_ENV: token})
            )
        click.echo(_run_cli("list", "--server", server.grpc))

        step = "grpc"
        _step("4/5 requests with images — gRPC (Python client) and HTTP (official `openai` client)")
        world_tasks = {e.task: data.load_task(world / e.task, splits=("test",)) for e in EXPERTS}
        with DeltaClient(server.grpc) as client:
            for expert in EXPERTS:
                target = json.loads((bundles[expert.name] / "delta.json").read_text())["task"]["metrics"].get(
                    "target", float("nan")
                )
                click.secho(
                    f"\n[{expert.name}] ({expert.method}, task `{expert.task}`) over gRPC — measured test accuracy {target:.2f}",
                    fg="cyan",
                )
                click.echo(f"  {'question':<34} {'gold':<10} {'base':<14} {'expert':<14} auto → (score)")
                rows = []
                test = world_tasks[expert.task]["test"]
                # A fixed random draw of test questions (seeded, the same every run): not picked by outcome.
                for sample in random.Random(f"demo\0{expert.name}").sample(test, min(config.questions, len(test))):
                    # The user's question as a one-turn chat: the server applies the template (same tokens as training).
                    prompt = sample.prompt
                    kwargs = {"image": sample.image, "max_tokens": config.max_tokens, "temperature": 0.0, "chat": True}
                    base_out = client.generate(prompt, task=server.base_name, **kwargs)
                    expert_out = client.generate(prompt, task=expert.name, **kwargs)
                    auto_out = client.generate(prompt, task="auto", **kwargs)
                    routing = auto_out.routing
                    click.echo(
                        f"  {_cell(sample.prompt, 34):<34} {_cell(sample.target, 10):<10} {_cell(base_out.text, 14):<14} "
                        f"{_cell(expert_out.text, 14):<14} {routing.expert} ({routing.score:.2f})"
                    )
                    rows.append(
                        {
                            "question": sample.prompt,
                            "gold": sample.target,
                            "base": base_out.text,
                            "expert": expert_out.text,
                            "auto": routing.expert,
                            "served_by": expert_out.routing.expert,
                        }
                    )
                shown["experts"][expert.name] = rows
            open_world = client.generate(
                "Write a haiku about the sea.", task="auto", max_tokens=config.max_tokens, temperature=0.0, chat=True
            )
            click.echo(f"\n  open-world text → auto router: {open_world.routing.expert} — {open_world.routing.reason}")
            shown["open_world"] = open_world.routing.expert

        step = "http"
        from openai import OpenAI

        oai = OpenAI(base_url=f"{server.http}/v1", api_key=token)
        models = [m.id for m in oai.models.list().data]
        click.secho(f"\nHTTP /v1/models: {models}", fg="cyan")
        sample = world_tasks["relations"]["test"][0]
        for model in (server.base_name, "relations-lora", "auto"):
            chat = oai.chat.completions.create(
                model=model,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": _data_url(sample.image)}},
                            {"type": "text", "text": sample.prompt},
                        ],
                    }
                ],
                max_tokens=config.max_tokens,
                temperature=0.0,
            )
            answer = chat.choices[0].message.content
            click.echo(f"  chat model={model:<16} served by {chat.model:<16} → {answer!r}")
            shown["http"][model] = {"served_by": chat.model, "answer": answer}
        shown["models"] = models

        step = "metrics"
        _step("5/5 metrics (`deltaserve metrics`), then a clean shutdown")
        with __import__("urllib.request").request.urlopen(f"{server.http}/metrics", timeout=30) as resp:
            click.echo(textwrap.indent(summarize(resp.read().decode()), "  "))
        step = "shutdown"
        code = server.terminate(120)
        shown["exit_code"] = code
        if code != 0:
            raise RuntimeError(f"the server exited with {code} on SIGTERM (log: {server.log_path})")
        click.echo(f"server stopped cleanly (exit {code}); total {time.perf_counter() - started:.0f} s")
    except DemoError:
        raise
    except Exception as exc:
        raise DemoError(
            step, f"{exc}" + (f"\n--- server log tail ---\n{server.tail()}" if server is not None else "")
        ) from exc
    finally:
        if server is not None:
            server.stop()
    return shown


def main(workdir: Path | None, tiny: bool, tune_steps: int | None) -> dict:
    config = TINY if tiny else DemoConfig()
    if tune_steps is not None:
        config = replace(config, tune_steps=tune_steps)
    if workdir is not None:
        return run_demo(config, workdir)
    with tempfile.TemporaryDirectory(prefix="deltaserve-demo-") as tmp:
        return run_demo(config, Path(tmp))
