"""The HTTP front end's last resort: an exception no handler maps (a bug, the server's own file system failing)
is a 500 in the OpenAI error shape, without the exception's text, on a connection that stays open.

No client input is known to reach it any more (each one found became a 4xx), so the fault is injected into the
service the front end calls: the real app on a real uvicorn server, over a real connection, without vLLM.
Before: the 500 came from Starlette's outermost middleware, which re-raises, and uvicorn then closed the
connection (http.client: RemoteDisconnected on the next request).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading

import uvicorn

SECRET = "/srv/deltaserve/store/staging/0123abcd"


class _FailingService:
    """What ``create_app`` needs of a DeltaService for ``/v1/models``; listing the deltas fails inside the server."""

    base_name = "base"
    healthy = True

    def deltas(self):
        raise OSError(5, "Input/output error", f"{SECRET}/delta.json")


def test_an_unexpected_error_is_a_500_in_the_openai_shape_and_the_connection_stays_open():
    from deltaserve.client.process import free_port
    from deltaserve.server.http_api import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(_FailingService()), host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    )
    thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(2):  # the second request rides the same connection
            conn.request("GET", "/v1/models")
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 500, body
            payload = json.loads(body)
            assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}, payload
            assert SECRET not in body.decode() and "Input/output" not in body.decode(), payload
        conn.close()
    finally:
        server.should_exit = True
        thread.join(30)
