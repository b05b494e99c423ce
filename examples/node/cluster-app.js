// The program every Node cluster tutorial starts from, unchanged: run alone (`node
// cluster-app.js`), its primary forks one worker per CPU; run under cluster-lb
// (`cluster-lb run -w 4 -- node cluster-app.js`), every process is a worker, and cluster-lb is
// the primary.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');
const os = require('node:os');

if (cluster.isPrimary) {
  const workers = Number(process.env.WORKERS ?? os.cpus().length);
  for (let i = 0; i < workers; i++) {
    cluster.fork();
  }
  cluster.on('exit', (worker, code, signal) => {
    console.log(`worker ${worker.process.pid} died (${signal || code})`);
  });
} else {
  http
    .createServer((req, res) => {
      res.end(`worker ${cluster.worker.id} pid ${process.pid}\n`);
    })
    .listen(Number(process.env.PORT ?? 3000));
}
