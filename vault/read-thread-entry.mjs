// The vault read thread's entry point (see read-thread.ts). A thread does not inherit the loader the
// main thread runs TypeScript with, so it registers tsx itself before loading the thread's module.
import { fileURLToPath } from 'node:url';
import { register } from 'tsx/esm/api';

register({ tsconfig: fileURLToPath(new globalThis.URL('../tsconfig.json', import.meta.url)) });
await import('./read-thread-worker.ts');
