#!/usr/bin/env node
// Trivial Node `ws` echo server used to measure the load generator's ceiling.
// On connect it sends a hello frame (so the generator's handshake logic is the same
// as against tidings); every text frame is echoed back on the same socket.  With
// --acks it first sends a small ack frame, so the generator handles the same number
// of frames per message as against tidings (1 send, 1 ack, 1 delivery).
//   node echo_server.mjs [--port 0] [--host 127.0.0.1] [--acks]
// Logs "event=listening port=N" on stderr.
import process from 'node:process';
import { WebSocketServer } from 'ws';

const argv = process.argv.slice(2);
let port = 0, host = '127.0.0.1', acks = false;
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--port') port = Number(argv[++i]);
  else if (argv[i] === '--host') host = argv[++i];
  else if (argv[i] === '--acks') acks = true;
  else { process.stderr.write(`unknown argument ${argv[i]}\n`); process.exit(2); }
}
const ACK = '{"type":"ack","id":"0","msg_id":"0","delivered":1}';
let n = 0;
const wss = new WebSocketServer({ host, port, perMessageDeflate: false, clientTracking: false });
wss.on('connection', (ws) => {
  ws.send(`{"type":"hello","user":"echo","conn":"c-${++n}"}`);
  ws.on('message', (data, isBinary) => {
    if (acks) ws.send(ACK);
    ws.send(data, { binary: isBinary });
  });
  ws.on('error', () => {});
});
wss.on('listening', () => {
  const a = wss.address();
  process.stderr.write(`level=info event=listening url=ws://${a.address}:${a.port}/ host=${a.address} port=${a.port}\n`);
});
const stop = () => { wss.close(); process.exit(0); };
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
