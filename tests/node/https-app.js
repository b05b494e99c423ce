// Test app: an https server on PORT with the test certificate, answering "worker ID pid PID".
'use strict';
const fs = require('node:fs');
const https = require('node:https');
const path = require('node:path');

const tls = path.join(__dirname, 'tls');
const worker = process.env.CLUSTER_LB_WORKER_ID ?? '-';
https
  .createServer(
    { key: fs.readFileSync(path.join(tls, 'key.pem')), cert: fs.readFileSync(path.join(tls, 'cert.pem')) },
    (req, res) => res.end(`worker ${worker} pid ${process.pid}\n`),
  )
  .listen(Number(process.env.PORT ?? 8443));
