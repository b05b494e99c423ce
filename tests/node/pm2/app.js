// An app written for PM2: it reads NODE_APP_INSTANCE (PM2's instance number, 0 .. N-1; the
// docs' idiom runs a cron on instance '0' only) and NODE_ENV, and answers with what it sees.
// The worker id cluster-lb gives (1-based for Node, as cluster.worker.id); the app does not
// touch the cluster module, which would make cluster-lb run its primary branch.
const id = process.env.CLUSTER_LB_WORKER_ID;
const http = require('http');

const seen = () => ({
  worker: Number(id),
  pid: process.pid,
  instance: process.env.NODE_APP_INSTANCE,
  nodeEnv: process.env.NODE_ENV,
  port: process.env.PORT,
  cron: process.env.NODE_APP_INSTANCE === '0',
});

// GET /leak keeps 8 MiB (written, so resident) for good: memory that only a restart frees,
// which max_memory_restart is for.
const kept = [];

http
  .createServer((req, res) => {
    if (req.url === '/leak') kept.push(Buffer.alloc(8 << 20, 1));
    res.setHeader('Connection', 'close');
    res.end(JSON.stringify(seen()) + '\n');
  })
  .listen(process.env.PORT);
