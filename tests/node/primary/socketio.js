// Socket.IO with @socket.io/cluster-adapter as its documentation writes it
// (https://socket.io/docs/v4/cluster-adapter/), with two lines left out, each because
// cluster-lb does that job itself: @socket.io/sticky's setupMaster (cluster-lb's
// --strategy sticky keeps each client on one worker, in the kernel, and every worker listens
// on its own socket), and cluster.setupPrimary({ serialization: "advanced" }) (the docs: "you
// can ignore it if you only send plaintext objects"; cluster-lb's channel carries JSON).
// The event handlers at the end are the test's: echo, a broadcast from the client's worker,
// and fetchSockets() across the cluster.
const cluster = require("cluster");
const http = require("http");
const { Server } = require("socket.io");
const numCPUs = Number(process.env.WORKERS || require("os").cpus().length);
const { createAdapter, setupPrimary } = require("@socket.io/cluster-adapter");

if (cluster.isMaster) {
  console.log(`Master ${process.pid} is running`);

  // setup connections between the workers
  setupPrimary();

  for (let i = 0; i < numCPUs; i++) {
    cluster.fork();
  }

  cluster.on("exit", (worker) => {
    console.log(`Worker ${worker.process.pid} died`);
    cluster.fork();
  });
} else {
  console.log(`Worker ${process.pid} started`);

  const httpServer = http.createServer();
  const io = new Server(httpServer);

  // use the cluster adapter
  io.adapter(createAdapter());

  io.on("connection", (socket) => {
    socket.emit("hello", { worker: cluster.worker.id });
    socket.on("echo", (message, ack) => ack(message));
    socket.on("broadcast", (n) => io.emit("broadcasted", { from: cluster.worker.id, n }));
    socket.on("count", async (ack) => ack((await io.fetchSockets()).length));
  });

  httpServer.listen(Number(process.env.PORT || 3000));
}
