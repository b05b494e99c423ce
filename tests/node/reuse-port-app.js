// Test app: one server through the cluster (PORT) and one that bypasses it: reusePort on Node
// 22+ (the worker binds it itself), exclusive on older versions.
'use strict';
const http = require('node:http');

const worker = process.env.CLUSTER_LB_WORKER_ID ?? '-';
const handler = (req, res) => res.end(`worker ${worker} pid ${process.pid}\n`);
http.createServer(handler).listen(Number(process.env.PORT ?? 3000));
const major = Number(process.versions.node.split('.')[0]);
const bypass = major >= 22 ? { reusePort: true } : { exclusive: true };
// Node workers are numbered from 1 (cluster.worker.id): 3001, 3002, ...
http.createServer(handler).listen({ port: 3000 + Number(worker), host: '127.0.0.1', ...bypass });
