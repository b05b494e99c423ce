// A Node cluster program that leans on its primary the way real ones do: per-worker env from
// fork(env), configuration the workers ask for before they listen, requests answered by the
// primary, a broadcast on a timer, large messages both ways, a worker re-forked when it dies,
// and a server of the primary's own (PRIMARY_PORT) that shows cluster.workers. Every request
// to a worker returns `worker ID pid PID` on / (what the tests' clients parse).
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

const WORKERS = Number(process.env.WORKERS || 2);
const PORT = Number(process.env.PORT || 3000);
const PRIMARY_PORT = Number(process.env.PRIMARY_PORT || 3001);

if (cluster.isPrimary) {
  const config = { greeting: 'hello from the primary', primary: process.pid };
  const roleOf = {};
  const fork = (role) => {
    const worker = cluster.fork({ ROLE: role });
    roleOf[worker.id] = role;
    return worker;
  };
  for (let i = 1; i <= WORKERS; i++) fork(`role-${i}`);
  cluster.on('exit', (worker) => {
    if (!worker.exitedAfterDisconnect) fork(roleOf[worker.id]);
  });
  cluster.on('message', (worker, message) => {
    if (message.get === 'config') worker.send({ config });
    else if (message.ask !== undefined) worker.send({ answer: message.ask * 2, to: message.ask });
    else if (message.bigFromWorker !== undefined) worker.send({ gotBig: message.bigFromWorker.length });
    else if (message.wantBig !== undefined) worker.send({ big: 'x'.repeat(message.wantBig) });
  });
  let tick = 0;
  setInterval(() => {
    tick += 1;
    for (const worker of Object.values(cluster.workers)) worker.send({ tick });
  }, 100);
  http
    .createServer((req, res) => {
      const workers = Object.values(cluster.workers).map((w) => ({
        id: w.id,
        pid: w.process.pid,
        state: w.state,
        role: roleOf[w.id],
      }));
      res.end(JSON.stringify({ pid: process.pid, workers }));
    })
    .listen(PRIMARY_PORT);
} else {
  const id = cluster.worker.id;
  let ticks = 0;
  let asked = 0;
  const pending = new Map();
  process.on('message', (message) => {
    const answer = (key, value) => {
      const resolve = pending.get(key);
      pending.delete(key);
      if (resolve) resolve(value);
    };
    if (message.tick !== undefined) ticks = message.tick;
    else if (message.config !== undefined) answer('config', message.config);
    else if (message.answer !== undefined) answer(`ask${message.to}`, message.answer);
    else if (message.gotBig !== undefined) answer('gotBig', message.gotBig);
    else if (message.big !== undefined) answer('big', message.big.length);
  });
  const request = (key, message) =>
    new Promise((resolve) => {
      pending.set(key, resolve);
      process.send(message);
    });
  const size = (url) => Number(url.searchParams.get('size'));
  // The configuration comes from the primary, before the server listens.
  request('config', { get: 'config' }).then((config) => {
    http
      .createServer(async (req, res) => {
        const url = new URL(req.url, 'http://worker');
        switch (url.pathname) {
          case '/':
            return res.end(`worker ${id} pid ${process.pid}\n`);
          case '/info':
            return res.end(JSON.stringify({ id, pid: process.pid, role: process.env.ROLE, ticks, config }));
          case '/ask': {
            asked += 1;
            const n = asked * 1000 + id;
            return res.end(JSON.stringify({ n, answer: await request(`ask${n}`, { ask: n }) }));
          }
          case '/big-to-primary':
            return res.end(String(await request('gotBig', { bigFromWorker: 'y'.repeat(size(url)) })));
          case '/big-from-primary':
            return res.end(String(await request('big', { wantBig: size(url) })));
          default:
            res.statusCode = 404;
            return res.end();
        }
      })
      .listen(PORT);
  });
}
