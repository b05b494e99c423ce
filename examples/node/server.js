// A Node HTTP server that serves from the socket cluster-lb hands it (socket activation: fd 3),
// or listens on PORT (default 8080) when started on its own.
//
//   sudo cluster-lb run -w 4 --listen 127.0.0.1:8080 -- node examples/node/server.js
'use strict';
const http = require('node:http');

// Our id; under Node's cluster module or PM2 (used by the benchmark) their own numbering.
const cluster = require('node:cluster');
const workerId = process.env.CLUSTER_LB_WORKER_ID ?? process.env.NODE_APP_INSTANCE ?? cluster.worker?.id ?? '-';
const activated = process.env.LISTEN_PID === String(process.pid) && Number(process.env.LISTEN_FDS) >= 1;

const server = http.createServer((req, res) => {
  res.setHeader('Content-Type', 'text/plain');
  res.end(`worker ${workerId} pid ${process.pid}\n`);
});

server.listen(activated ? { fd: 3 } : Number(process.env.PORT ?? 8080), () => {
  console.log(`node worker ${workerId} pid ${process.pid} serving`);
});

// Graceful stop: finish in-flight requests, then exit.
process.on('SIGTERM', () => server.close(() => process.exit(0)));
