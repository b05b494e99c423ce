// A plain Node server (no primary branch) that answers every message it gets on its channel
// (`cluster-lb send`) with {echo: MESSAGE, worker: ID}, which the primary reports as a
// `message` event.
'use strict';
const http = require('node:http');

const id = Number(process.env.CLUSTER_LB_WORKER_ID);
process.on('message', (message) => process.send({ echo: message, worker: id }));
http
  .createServer((req, res) => res.end(`worker ${id} pid ${process.pid}\n`))
  .listen(Number(process.env.PORT));
