// A plain Node server for the launcher test (`npm start`): it answers with what it was started
// with, so the test sees that the package script's variables and arguments reached each worker.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

const id = cluster.worker ? cluster.worker.id : 0;
const env = process.env.NODE_ENV ?? '';
const args = process.argv.slice(2).join(' ');
http
  .createServer((req, res) =>
    res.end(`worker ${id} pid ${process.pid} NODE_ENV=${env} args=${args}\n`),
  )
  .listen(Number(process.env.PORT));
