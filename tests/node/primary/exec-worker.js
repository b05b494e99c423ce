// The workers of exec-checked.js and exec-unchecked.js.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

http
  .createServer((req, res) => res.end(`worker ${cluster.worker.id} pid ${process.pid}\n`))
  .listen(Number(process.env.PORT || 3000));
