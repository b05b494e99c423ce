// PM2's "Graceful Start/Shutdown" page: the app cleans up on SIGINT, PM2's stop signal, then
// exits. Its `db` stands for a connection pool: an open handle that keeps the process alive
// after its server closed. What it cleaned up is a file named after its pid in $CLEANUP_DIR.
const fs = require('fs');
const http = require('http');

const db = {
  timer: setInterval(() => {}, 1000),
  stop(done) {
    clearInterval(this.timer);
    fs.writeFileSync(`${process.env.CLEANUP_DIR}/cleaned-${process.pid}`, 'closed the pool\n');
    done();
  },
};

process.on('SIGINT', function () {
  db.stop(function (err) {
    process.exit(err ? 1 : 0);
  });
});

const server = http.createServer((req, res) => res.end(`worker ${process.env.CLUSTER_LB_WORKER_ID} pid ${process.pid}\n`));
// Socket-activated (--listen, --node off: no Node channel) or through Node's cluster channel.
server.listen(Number(process.env.LISTEN_FDS) > 0 ? { fd: 3 } : 3000);
