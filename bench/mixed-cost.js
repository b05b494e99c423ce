// The benchmark's mixed-cost worker: one request in ten blocks its event loop for 25 ms in a
// synchronous call (Atomics.wait: blocked without burning CPU, so a 2-core machine measures
// the balancing, not its own CPU limit); the rest answer at once. Socket activation (fd 3)
// under cluster-lb, else PORT (under Node's cluster module).
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

const worker = process.env.CLUSTER_LB_WORKER_ID ?? cluster.worker?.id ?? '-';
const activated = process.env.LISTEN_PID === String(process.pid) && Number(process.env.LISTEN_FDS) >= 1;
const blocker = new Int32Array(new SharedArrayBuffer(4));
let served = 0;

http
  .createServer((req, res) => {
    served += 1;
    if (served % 10 === 0) {
      Atomics.wait(blocker, 0, 0, 25);
      // For the benchmark's client to tell the two kinds of request apart.
      res.setHeader('x-slow', '1');
    }
    res.end(`worker ${worker} pid ${process.pid}\n`);
  })
  .listen(activated ? { fd: 3 } : Number(process.env.PORT ?? 8080));
