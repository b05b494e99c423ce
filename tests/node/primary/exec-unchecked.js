// cluster.setupPrimary({ exec }) at the top, without an isPrimary check: under Node this file
// only ever runs as the primary (its workers run exec-worker.js), so it never needed one.
'use strict';
const cluster = require('node:cluster');
const path = require('node:path');

cluster.setupPrimary({ exec: path.join(__dirname, 'exec-worker.js') });
for (let i = 0; i < Number(process.env.WORKERS || 2); i++) cluster.fork();
