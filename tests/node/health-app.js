// Test app for self-healing: GET /hang blocks the event loop for good (a synchronous loop, as
// a deadlock would); /pause blocks it 25 ms, then answers; /leak keeps 1 MiB (written, so it
// is resident) for good, then answers; anything else answers at once. Every answer is
// "worker ID pid PID" with `Connection: close`. A plain http server, no cluster code: its
// listen() gets a socket from cluster-lb.
'use strict';
const http = require('node:http');

const worker = process.env.CLUSTER_LB_WORKER_ID ?? '-';
const kept = [];
http
  .createServer((req, res) => {
    if (req.url === '/hang') for (;;);
    if (req.url === '/pause') {
      const until = Date.now() + 25;
      while (Date.now() < until);
    }
    if (req.url === '/leak') kept.push(Buffer.alloc(1 << 20, 1));
    res.setHeader('Connection', 'close');
    res.end(`worker ${worker} pid ${process.pid}\n`);
  })
  .listen(Number(process.env.PORT ?? 3000));
