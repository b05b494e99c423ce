"""An ASGI app for uvicorn and hypercorn under cluster-lb: answers `worker ID pid PID`.

ID is cluster-lb's worker id (CLUSTER_LB_WORKER_ID), PID the process that answered.

    sudo cluster-lb run -w 4 -l 8080 -- uvicorn --app-dir examples/python --fd 3 asgi_app:app
    sudo cluster-lb run -w 4 -l 8080 -- hypercorn --bind fd://3 examples/python/asgi_app:app
"""

import os


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        # Nothing to set up or tear down; answering lets the server start and stop cleanly.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    worker = os.environ.get("CLUSTER_LB_WORKER_ID", "-")
    body = f"worker {worker} pid {os.getpid()}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
