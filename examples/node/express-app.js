// An Express app as it is usually written: no cluster code, no socket activation. Under
// cluster-lb its app.listen(3000) asks cluster-lb for the socket (Node's own cluster protocol):
//
//   npm install express
//   sudo cluster-lb run -w 4 -- node express-app.js
'use strict';
const express = require('express');

const app = express();
const worker = process.env.CLUSTER_LB_WORKER_ID ?? '-';

app.get('/', (req, res) => {
  res.type('text/plain').send(`worker ${worker} pid ${process.pid}\n`);
});

app.listen(Number(process.env.PORT ?? 3000), () => {
  console.log(`express worker ${worker} pid ${process.pid} listening`);
});
