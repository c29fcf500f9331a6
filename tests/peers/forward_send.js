// Sends Engine-like records to a forward server with @fluent-org/logger (a real peer).
// Usage: node forward_send.js '<json options>'; prints {"sent": N} once every emit resolved
// (with ack: once every chunk was acknowledged).
"use strict";
const fs = require("fs");
const { FluentClient, EventTime } = require("@fluent-org/logger");

async function main() {
  const o = JSON.parse(process.argv[2]);
  const options = {
    socket: { host: o.host, port: o.port, timeout: 10000, disableReconnect: true },
    eventMode: o.mode,
    flushInterval: o.flushInterval || 0,
  };
  if (o.ack) options.ack = { ackTimeout: o.ackTimeout || 20000 };
  if (o.ca) {  // the client reads TLS options from `socket.tls`
    options.socket.tls = { ca: fs.readFileSync(o.ca), servername: "localhost" };
    if (o.cert) {
      options.socket.tls.cert = fs.readFileSync(o.cert);
      options.socket.tls.key = fs.readFileSync(o.key);
    }
  }
  if (o.sharedKey) {
    options.security = { clientHostname: o.clientHostname || "engine-01", sharedKey: o.sharedKey,
                         username: o.username || "", password: o.password || "" };
  }
  const logger = new FluentClient(o.tag, options);
  await logger.connect();
  const pending = [];
  for (let n = o.start; n < o.start + o.count; n++) {
    const record = { id: `node-${n}`, customer_name: o.customer || "acme", fqdn: "www.acme.test",
                     log_type: "nginx", status: 200, msg: "ログ ✓" };
    pending.push(logger.emit(record, new EventTime(1732500000, 500000000)));
  }
  await Promise.all(pending);
  await logger.disconnect();
  process.stdout.write(JSON.stringify({ sent: o.count }) + "\n");
}

main().catch((err) => {
  process.stderr.write(`forward_send failed: ${err && err.stack || err}\n`);
  process.exit(1);
});
