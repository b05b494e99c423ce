// An HTTP server on the Unix socket path SOCKET_PATH, as an app behind nginx listens:
// `server.listen(path)`. Under Node's cluster (or cluster-lb) every worker gets the one socket.
'use strict';
const http = require('node:http');
const cluster = require('node:cluster');

const id = cluster.worker?.id ?? '-';
http
  .createServer((req, res) => res.end(`worker ${id} pid ${process.pid}\n`))
  .listen(process.env.SOCKET_PATH, () => {
    console.log(`worker ${id} listening on ${process.env.SOCKET_PATH}`);
  });
