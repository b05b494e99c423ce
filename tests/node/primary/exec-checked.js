// cluster.setupPrimary({ exec }) inside an isPrimary check, with no worker branch: under Node
// this file only ever runs as the primary, and the workers run exec-worker.js.
'use strict';
const cluster = require('node:cluster');
const path = require('node:path');

if (cluster.isPrimary) {
  cluster.setupPrimary({ exec: path.join(__dirname, 'exec-worker.js') });
  for (let i = 0; i < Number(process.env.WORKERS || 2); i++) cluster.fork();
}
