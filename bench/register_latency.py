"""Register → first-token latency on a running server: LoRA and sparse deltas, median of 5 each.

    .venv/bin/python bench/register_latency.py

Starts `deltaserve serve` on a random-init tiny base (child process), then per kind registers a fresh
delta over gRPC and times until the first token of a streamed request to it arrives.
"""

import statistics
import tempfile
import time
from pathlib import Path


def main():
    from deltaserve.client.process import ServerProcess
    from deltaserve.client.sync import DeltaClient
    from deltaserve.tuning.base.factory import build_base
    from deltaserve.tuning.synthetic import make_lora_bundle, make_sparse_bundle

    work = Path(tempfile.mkdtemp())
    base = build_base(work / "base", seed=0)
    t = time.perf_counter()
    srv = ServerProcess(base, work / "store", "--kv-cache-memory-bytes", str(256 << 20), admin_token="t")
    print("server start (incl. engine)", round(time.perf_counter() - t, 1), "s")
    out = {}
    try:
        with DeltaClient(srv.grpc, admin_token="t") as c:
            c.generate("Hello", task=srv.base_name, max_tokens=2)
            for kind, make in (("lora", make_lora_bundle), ("sparse", make_sparse_bundle)):
                lat = []
                for k in range(5):
                    b = make(base, work / f"{kind}{k}", f"{kind}-{k}", seed=k)
                    t = time.perf_counter()
                    c.register(b)
                    for chunk in c.generate_stream("Hello", task=f"{kind}-{k}", max_tokens=4):
                        if chunk.token_ids:
                            break
                    lat.append(time.perf_counter() - t)
                out[kind] = lat
                print(
                    kind,
                    "register→first token: median",
                    round(1e3 * statistics.median(lat)),
                    "ms",
                    [round(1e3 * x) for x in lat],
                )
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
