// prom-client's cluster example (example/cluster.js in its repository, as its README points
// to it): the primary serves the workers' metrics, aggregated over IPC, at /cluster_metrics on
// its own port; every worker counts the requests it serves.
'use strict';
const cluster = require('cluster');
const express = require('express');
const metricsServer = express();
const AggregatorRegistry = require('prom-client').AggregatorRegistry;
const aggregatorRegistry = new AggregatorRegistry();

if (cluster.isMaster) {
  for (let i = 0; i < Number(process.env.WORKERS || 4); i++) {
    cluster.fork();
  }

  metricsServer.get('/cluster_metrics', async (req, res) => {
    try {
      const metrics = await aggregatorRegistry.clusterMetrics();
      res.set('Content-Type', aggregatorRegistry.contentType);
      res.send(metrics);
    } catch (ex) {
      res.statusCode = 500;
      res.send(ex.message);
    }
  });

  metricsServer.listen(Number(process.env.PRIMARY_PORT || 3001));
  console.log('Cluster metrics server listening to 3001, metrics exposed on /cluster_metrics');
} else {
  const client = require('prom-client');
  const served = new client.Counter({ name: 'served_total', help: 'Requests served' });
  const app = express();
  app.get('/', (req, res) => {
    served.inc();
    res.send(`worker ${cluster.worker.id} pid ${process.pid}\n`);
  });
  app.listen(Number(process.env.PORT || 3000));
}
