// One Node worker for bench/run.py: `/` hello world, `/cpu` a fixed amount of JS work (~5 ms, calibrated by
// run.py and passed as BENCH_CPU_ITERS_JS). Run alone, by cluster.js (Node's cluster module) or by PM2 -i max.
'use strict';
const http = require('http');
const ITERS = +(process.env.BENCH_CPU_ITERS_JS || 1000000);
const PORT = +(process.env.PORT || process.argv[2] || 8000);

function burn(iters) {
  let acc = 0;
  for (let i = 0; i < iters; i++) acc = (acc + i * i) % 1000003;
  return acc;
}

if (process.argv[2] === '--calibrate') {  // print iterations that take ~5 ms here
  let n = 200000, best = Infinity;
  for (let k = 0; k < 5; k++) {
    const t0 = process.hrtime.bigint();
    burn(n);
    best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1e9);
  }
  console.log(Math.max(1000, Math.round(n * 0.005 / best)));
} else {
  http.createServer((req, res) => {
    const headers = {'Content-Type': 'text/plain', 'X-Pid': String(process.pid)};
    if (req.url === '/cpu') { const body = burn(ITERS) + '\n'; res.writeHead(200, headers); res.end(body); }
    else if (req.url === '/') { res.writeHead(200, headers); res.end('Hello, world!\n'); }
    else { res.writeHead(404, headers); res.end('not found\n'); }
  }).listen(PORT, '127.0.0.1', () => { if (process.send) process.send('ready'); });
}
