// Node's cluster module as the seeds use it: a primary forks BENCH_WORKERS copies of server.js sharing one
// port (round-robin by the primary, the Linux default) and forks a new one when a worker dies.
'use strict';
const cluster = require('cluster');
const path = require('path');
const n = +(process.env.BENCH_WORKERS || require('os').availableParallelism());
cluster.setupPrimary({exec: path.join(__dirname, 'server.js'), args: process.argv.slice(2)});
for (let i = 0; i < n; i++) cluster.fork();
cluster.on('exit', (w, code, signal) => { if (!w.exitedAfterDisconnect) cluster.fork(); });
