// A worker that sends a message the moment it starts, and a primary that forks only a second
// after it starts: the workers cluster-lb started before the primary branch ran (it learns of
// the branch when a worker reads cluster.isPrimary) have sent theirs before any Worker object
// exists for them. Under Node the message waits in the channel; the primary must hear it when
// its fork takes the running worker. PRIMARY_PORT answers with what the primary heard.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

const WORKERS = Number(process.env.WORKERS || 2);
const PORT = Number(process.env.PORT || 3000);
const PRIMARY_PORT = Number(process.env.PRIMARY_PORT || 3001);

if (cluster.isPrimary) {
  const heard = [];
  setTimeout(() => {
    for (let i = 0; i < WORKERS; i++) {
      const worker = cluster.fork();
      worker.on('message', (message) => heard.push({ id: worker.id, message }));
    }
  }, 1000);
  http
    .createServer((req, res) => res.end(JSON.stringify(heard)))
    .listen(PRIMARY_PORT);
} else {
  process.send(`hello from ${process.pid}`);
  http.createServer((req, res) => res.end('ok')).listen(PORT);
}
