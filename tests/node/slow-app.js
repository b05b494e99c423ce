// Test app: GET /slow answers after 1 s, anything else at once: "worker ID pid PID". A plain
// http server (keep-alive on by default), no cluster code.
'use strict';
const http = require('node:http');

const worker = process.env.CLUSTER_LB_WORKER_ID ?? '-';
http
  .createServer((req, res) => {
    const answer = () => res.end(`worker ${worker} pid ${process.pid}\n`);
    if (req.url === '/slow') setTimeout(answer, 1000);
    else answer();
  })
  .listen(Number(process.env.PORT ?? 3000));
