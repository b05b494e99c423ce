// Test app: a dgram socket bound through the cluster (Node sends queryServer for it), answering
// every datagram with "worker ID pid PID".
'use strict';
const dgram = require('node:dgram');

const worker = process.env.CLUSTER_LB_WORKER_ID ?? '-';
const socket = dgram.createSocket('udp4');
socket.on('message', (message, client) => {
  socket.send(`worker ${worker} pid ${process.pid}\n`, client.port, client.address);
});
socket.bind(Number(process.env.PORT ?? 5353), '127.0.0.1');
