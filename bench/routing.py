"""Routing accuracy of the ``auto`` router on the tuning world (held-out prompts) and open-world prompts.

::

    .venv/bin/python bench/routing.py [--out docs/]

Builds (or reuses) the world and the base — the pretrained base when
``deltaserve.tuning.pretrain.cached_base()`` has one, else a fresh random-init base —,
chooses ``threshold`` / ``image_weight`` on the validation split, measures the router's
defaults on the test split, prints the confusion matrix and writes
``<out>/routing-results.md`` and ``<out>/routing-results.json``. The logic lives in
:mod:`deltaserve.server.routing_eval` (shared with ``tests/server/test_routing_accuracy.py``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"), help="directory for routing-results.md/.json (default: docs/)")
    parser.add_argument("--examples", type=int, default=24, help="examples per registered task (default 24, as `deltaserve tune`)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example draw (default 0)")
    args = parser.parse_args(argv)

    from deltaserve.server import routing_eval as E

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deltaserve-routing-") as work:
        result = E.run_benchmark(Path(work), n_examples=args.examples, seed=args.seed)
    result["timings"]["total_s"] = round(time.perf_counter() - started, 1)
    rep = E.RoutingReport(**result["result"])
    command = ".venv/bin/python bench/routing.py" + ("" if args.out == Path("docs") else f" --out {args.out}")
    if args.examples != 24 or args.seed != 0:
        command += f" --examples {args.examples} --seed {args.seed}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing-results.md").write_text(E.markdown(result, command), encoding="utf-8")
    E.write_json(args.out / "routing-results.json", result)

    print(E.confusion_table(rep))
    print(f"\nright expert: {rep.expert_accuracy:.1%}   open world to base: {rep.open_world_accuracy:.1%}   "
          f"({'PASS' if result['passed'] else 'FAIL'}; base: {result['base']['kind']}; options {result['options']})")
    print(f"route {rep.route_ms:.2f} ms/request; total {result['timings']['total_s']} s; wrote {args.out}/routing-results.md, .json")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
