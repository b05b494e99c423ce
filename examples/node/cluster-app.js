// The program every Node cluster tutorial starts from, unchanged: run alone (`node
// cluster-app.js`), its primary forks one worker per CPU (WORKERS to say how many); run under
// cluster-lb (`cluster-lb run -- node cluster-app.js`), its primary branch runs too, in a
// process of its own, and each cluster.fork() starts a cluster-lb worker with its own socket in
// the port's reuseport group (with -w N, cluster-lb keeps N: docs/NODE.md, "Who decides").
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
