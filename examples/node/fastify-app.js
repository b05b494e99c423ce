// A Fastify app as it is usually written. Under cluster-lb its listen() asks cluster-lb for the
// socket (Node's own cluster protocol):
//
//   npm install fastify
//   sudo cluster-lb run -w 4 -- node fastify-app.js
'use strict';
const fastify = require('fastify')();

const worker = process.env.CLUSTER_LB_WORKER_ID ?? '-';

fastify.get('/', async (request, reply) => {
  reply.type('text/plain');
  return `worker ${worker} pid ${process.pid}\n`;
});

fastify.listen({ port: Number(process.env.PORT ?? 3000), host: '0.0.0.0' }, (err) => {
  if (err) {
    console.error(err);
    process.exit(1);
  }
  console.log(`fastify worker ${worker} pid ${process.pid} listening`);
});
