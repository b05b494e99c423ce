// PM2's wait_ready app ("Graceful Start/Shutdown"): it listens, then needs 2 s (a cache to
// warm, a database to open) before it can serve, and says so with process.send('ready'). A
// request that reaches it before that gets a 500: under --wait-ready none may.
// The worker id cluster-lb gives (1-based for Node, as cluster.worker.id); the app does not
// touch the cluster module, which would make cluster-lb run its primary branch.
const id = process.env.CLUSTER_LB_WORKER_ID;
const http = require('http');

let ready = false;
const server = http.createServer((req, res) => {
  res.setHeader('Connection', 'close');
  if (!ready) {
    res.statusCode = 500;
    res.end(`not ready: worker ${id} pid ${process.pid}\n`);
    return;
  }
  res.end(`worker ${id} pid ${process.pid}\n`);
});

server.listen(3000, () => {
  setTimeout(() => {
    ready = true;
    process.send('ready');
  }, 2000);
});
