// Test app: worker 1 (the first: Node workers count from 1) misbehaves on Node's cluster channel in the way argv[2] names, after it
// listens; every worker serves "worker ID pid PID" on PORT.
'use strict';
const fs = require('node:fs');
const http = require('node:http');

const worker = process.env.CLUSTER_LB_WORKER_ID;
const mode = process.argv[2];
// No --listen: the channel is the first fd after stdio.
const CHANNEL_FD = 3;

const server = http.createServer((req, res) => res.end(`worker ${worker} pid ${process.pid}\n`));
server.listen(Number(process.env.PORT ?? 3000), () => {
  if (worker !== '1') return;
  switch (mode) {
    case 'garbage':
      fs.writeSync(CHANNEL_FD, 'this is not json\n');
      break;
    case 'endless':
      // A 2 MB message (Node sends it whole), over --max-message, then an ordinary one: the
      // long one is dropped, the one after arrives.
      process.send('x'.repeat(2 * 1024 * 1024));
      process.send({ after: 'endless' });
      break;
    case 'handle':
      // A handle the primary must acknowledge, or every later message stays queued in Node.
      process.send({ with: 'a handle' }, server);
      process.send({ after: 'handle' });
      break;
    case 'unknown-act':
      process.send({ cmd: 'NODE_CLUSTER', act: 'selfdestruct', seq: 99 });
      process.send({ after: 'unknown-act' });
      break;
    default:
      throw new Error(`unknown mode ${mode}`);
  }
});
