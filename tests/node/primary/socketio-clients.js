// CLIENTS Socket.IO clients (default transports: long polling, then websocket), each from
// its own loopback address (127.0.0.10, .11, ...) so that a sticky strategy spreads them over
// the workers. Each connects and echoes; then each asks its worker to broadcast to everyone;
// then one asks how many sockets the cluster has. Prints one JSON line with what it saw.
'use strict';
const http = require('node:http');
const { io } = require('socket.io-client');

const CLIENTS = Number(process.env.CLIENTS || 8);
const URL = process.env.URL || 'http://127.0.0.1:3000';
const within = (ms, what, promise) =>
  Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms))]);

async function main() {
  const sockets = [];
  const workers = [];
  const received = [];
  for (let i = 0; i < CLIENTS; i++) {
    const localAddress = `127.0.0.${10 + i}`;
    const socket = io(URL, {
      agent: new http.Agent({ localAddress }),
      localAddress,
      reconnection: false,
    });
    received.push([]);
    socket.on('broadcasted', (message) => received[i].push(message));
    const hello = await within(10000, `client ${i} hello`, new Promise((resolve, reject) => {
      socket.once('hello', resolve);
      socket.once('connect_error', reject);
    }));
    workers.push(hello.worker);
    sockets.push(socket);
  }
  const echoes = await Promise.all(sockets.map((s, i) => within(10000, `echo ${i}`, s.emitWithAck('echo', { i }))));
  // Wait until every client upgraded or settled, then broadcast from every client's worker.
  await new Promise((resolve) => setTimeout(resolve, 500));
  sockets.forEach((s, i) => s.emit('broadcast', i));
  const deadline = Date.now() + 10000;
  while (received.some((r) => r.length < CLIENTS) && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const count = await within(10000, 'count', sockets[0].emitWithAck('count'));
  console.log(JSON.stringify({
    workers,
    echoes: echoes.map((e) => e.i),
    received: received.map((r) => r.length),
    from: [...new Set(received.flat().map((m) => m.from))].sort(),
    count,
  }));
  sockets.forEach((s) => s.close());
}

main().catch((error) => {
  console.error(String(error));
  process.exit(1);
});
