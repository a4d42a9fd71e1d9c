'use strict';
// Loaded by path, both by the SDK's require() (clients, workers) and by the workflow bundler, so it
// is plain CommonJS. Failure messages and stack traces go into an encoded payload, which the
// payload codec (vault/payload-codec.ts) encrypts like every other payload.
const { DefaultFailureConverter } = require('@temporalio/common');

exports.failureConverter = new DefaultFailureConverter({ encodeCommonAttributes: true });
