// Node's own cluster module running examples/node/server.js (or SERVER), for the benchmark's
// comparison. NODE_CLUSTER_SCHED_POLICY=rr (primary accepts and hands out, the default) or none
// (workers accept on one shared socket); WORKERS workers; PORT as for the server.
'use strict';
const cluster = require('node:cluster');
const path = require('node:path');

const workers = Number(process.env.WORKERS ?? 2);
cluster.setupPrimary({ exec: process.env.SERVER ?? path.join(__dirname, '..', 'examples', 'node', 'server.js') });
for (let i = 0; i < workers; i++) cluster.fork();
let stopping = false;
process.on('SIGTERM', () => {
  stopping = true;
  cluster.disconnect(() => process.exit(0));
});
cluster.on('exit', () => {
  if (!stopping) cluster.fork();
});
