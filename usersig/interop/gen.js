// gen.js generates UserSigs with the official npm package tls-sig-api-v2, for
// the Go interop tests in ../interop_test.go.
//
// stdin:  a JSON array of cases
//         {"sdkappid": number, "key": string, "user": string, "expire": number,
//          "userbuf": base64 string or null, "now_ms": number}
// stdout: a JSON array of UserSig strings, one per case, in the same order.
//
// The package reads the clock through Date.now, so Date.now is overridden
// with now_ms for each case. A null userbuf goes through genUserSig (no
// TLS.userbuf); any other value (even "") is decoded to a Buffer and passed to
// genSig, the one function that takes a caller-supplied userbuf
// (genPrivateMapKey builds its own).
'use strict';

const TLSSigAPIv2 = require('tls-sig-api-v2');

function fail(msg) {
  process.stderr.write('gen.js: ' + msg + '\n');
  process.exit(2);
}

function check(c, i) {
  if (c === null || typeof c !== 'object') fail(`case ${i}: not an object`);
  if (!Number.isSafeInteger(c.sdkappid) || c.sdkappid <= 0) fail(`case ${i}: sdkappid must be a positive safe integer`);
  if (typeof c.key !== 'string' || c.key === '') fail(`case ${i}: key must be a non-empty string`);
  if (typeof c.user !== 'string' || c.user === '') fail(`case ${i}: user must be a non-empty string`);
  if (!Number.isSafeInteger(c.expire) || c.expire <= 0) fail(`case ${i}: expire must be a positive integer (seconds)`);
  if (c.userbuf !== null && typeof c.userbuf !== 'string') fail(`case ${i}: userbuf must be base64 or null`);
  if (!Number.isSafeInteger(c.now_ms) || c.now_ms < 0) fail(`case ${i}: now_ms must be a non-negative integer`);
}

function main(input) {
  let cases;
  try {
    cases = JSON.parse(input);
  } catch (e) {
    fail('stdin is not JSON: ' + e.message);
  }
  if (!Array.isArray(cases)) fail('stdin must be a JSON array');

  const realNow = Date.now;
  const out = [];
  try {
    cases.forEach((c, i) => {
      check(c, i);
      Date.now = () => c.now_ms;
      const api = new TLSSigAPIv2.Api(c.sdkappid, c.key);
      if (c.userbuf === null) {
        out.push(api.genUserSig(c.user, c.expire));
      } else {
        out.push(api.genSig(c.user, c.expire, Buffer.from(c.userbuf, 'base64')));
      }
    });
  } finally {
    Date.now = realNow;
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (d) => { input += d; });
process.stdin.on('end', () => main(input));
