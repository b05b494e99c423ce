// Test client: two TLS connections to 127.0.0.1:PORT, the second offering the session ticket
// the first got. Prints {"first": body, "second": body, "resumed": bool} as one JSON line.
'use strict';
const tls = require('node:tls');

const port = Number(process.argv[2]);

function request(session) {
  return new Promise((resolve, reject) => {
    let body = '';
    let ticket = null;
    const socket = tls.connect(
      { host: '127.0.0.1', port, servername: 'localhost', rejectUnauthorized: false, session },
      () => socket.write('GET / HTTP/1.0\r\nHost: localhost\r\n\r\n'),
    );
    socket.on('session', (s) => { ticket = s; });
    socket.on('data', (d) => { body += d; });
    socket.on('end', () => resolve({ body: body.split('\r\n\r\n')[1]?.trim(), resumed: socket.isSessionReused(), ticket }));
    socket.on('error', reject);
  });
}

(async () => {
  const first = await request(undefined);
  const second = await request(first.ticket);
  console.log(JSON.stringify({ first: first.body, second: second.body, resumed: second.resumed }));
})().catch((e) => { console.error(e); process.exit(1); });
