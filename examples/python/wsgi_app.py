"""A WSGI app for gunicorn under cluster-lb: answers `worker ID pid PID`.

ID is cluster-lb's worker id (CLUSTER_LB_WORKER_ID, inherited by the process gunicorn forks to
serve), so shares can be counted per cluster-lb worker; PID is the process that answered.

    sudo cluster-lb run -w 4 -l 8080 -- gunicorn --no-control-socket --chdir examples/python wsgi_app:app
"""

import os


def app(environ, start_response):
    worker = os.environ.get("CLUSTER_LB_WORKER_ID", "-")
    body = f"worker {worker} pid {os.getpid()}\n".encode()
    start_response(
        "200 OK",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
    )
    return [body]
