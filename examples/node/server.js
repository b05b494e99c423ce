// A Node HTTP server that serves from the socket cluster-lb hands it (socket activation: fd 3),
// or listens on PORT (default 8080) when started on its own.
//
//   sudo cluster-lb run -w 4 --listen 127.0.0.1:8080 -- node examples/node/server.js
//
// It stops without failing a request, keep-alive clients included: see drain() below.
'use strict';
const http = require('node:http');

// Our id; under Node's cluster module or PM2 (used by the benchmark) their own numbering.
const cluster = require('node:cluster');
const workerId = process.env.CLUSTER_LB_WORKER_ID ?? process.env.NODE_APP_INSTANCE ?? cluster.worker?.id ?? '-';
const activated = process.env.LISTEN_PID === String(process.pid) && Number(process.env.LISTEN_FDS) >= 1;

// How long a keep-alive connection must have been idle before a stopping server closes it.
// A client that keeps using its connection sends its next request within this time and gets
// the answer with `Connection: close`; closing a connection the moment it is idle would race
// a request the client is already sending on it, which fails that request.
const IDLE_BEFORE_CLOSE_MS = 1000;

let draining = false;
// Every connection, with whether a request is in flight on it and when it was last used.
const connections = new Map();

const server = http.createServer((req, res) => {
  const state = connections.get(req.socket);
  if (state) state.busy = true;
  res.on('finish', () => {
    if (state) {
      state.busy = false;
      state.used = Date.now();
    }
  });
  res.setHeader('Content-Type', 'text/plain');
  if (draining) res.setHeader('Connection', 'close');
  res.end(`worker ${workerId} pid ${process.pid}\n`);
});

server.on('connection', (socket) => {
  connections.set(socket, { busy: false, used: Date.now() });
  socket.on('close', () => connections.delete(socket));
});

// Stop accepting, answer what comes on open connections with `Connection: close`, and close
// connections that stay idle. Node's own server.close() (called by cluster-lb's `disconnect`,
// or by the SIGTERM handler below) would close idle keep-alive connections at once (Node 19+):
// that is replaced here by the gentler rule above.
function drain() {
  if (draining) return;
  draining = true;
  const sweep = setInterval(() => {
    const now = Date.now();
    for (const [socket, state] of connections) {
      if (!state.busy && now - state.used >= IDLE_BEFORE_CLOSE_MS) socket.destroy();
    }
    if (connections.size === 0) clearInterval(sweep);
  }, 100);
}
server.closeIdleConnections = () => {};
const close = server.close.bind(server);
server.close = (callback) => {
  drain();
  return close(callback);
};

server.listen(activated ? { fd: 3 } : Number(process.env.PORT ?? 8080), () => {
  console.log(`node worker ${workerId} pid ${process.pid} serving`);
});

// Graceful stop when cluster-lb (or anyone) sends SIGTERM: finish, then exit.
process.on('SIGTERM', () => server.close(() => process.exit(0)));
