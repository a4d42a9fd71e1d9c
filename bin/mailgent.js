#!/usr/bin/env node
// The `mailgent` command: runs cli/main.ts through tsx (the project has no build step), from any
// working directory. Paths resolve relative to this file, not to the caller's directory.
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { register } from 'tsx/esm/api';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
register({ tsconfig: join(root, 'tsconfig.json') });
await import('../cli/main.ts');
