import js from '@eslint/js';
import tseslint from 'typescript-eslint';

const nodeBuiltins = ['fs', 'path', 'crypto', 'child_process', 'net', 'http', 'https', 'os', 'stream', 'events', 'util', 'url', 'timers', 'worker_threads', 'dns', 'tls'];

export default tseslint.config(
  { ignores: ['node_modules/', '.data/', 'bench/results/'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    // CommonJS modules the Temporal SDK loads by path (vault/failure-converter.cjs).
    files: ['**/*.cjs'],
    languageOptions: { sourceType: 'commonjs', globals: { require: 'readonly', exports: 'writable', module: 'writable' } },
    rules: { '@typescript-eslint/no-require-imports': 'off' },
  },
  {
    files: ['**/*.ts'],
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    rules: {
      '@typescript-eslint/no-floating-promises': 'error',
      '@typescript-eslint/no-misused-promises': ['error', { checksVoidReturn: false }],
      '@typescript-eslint/no-explicit-any': 'off',
      '@typescript-eslint/no-non-null-assertion': 'off',
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
    },
  },
  {
    // Workflow code is replayed: it must be deterministic, so no I/O, no Node built-ins, no wall clock.
    files: ['workflows/**/*.ts'],
    rules: {
      'no-restricted-imports': [
        'error',
        {
          paths: nodeBuiltins.flatMap((m) => [m, `node:${m}`]).map((name) => ({ name, message: 'workflows must not use Node built-ins' })),
          patterns: [
            { group: ['../vault/*', '../db/*', '../mail/*', '../providers/*', '../api/*', '../core/*'], message: 'workflows reach these only through activities' },
            { group: ['../activities', '../activities/*'], message: 'import activities with `import type` only', allowTypeImports: true },
          ],
        },
      ],
      'no-restricted-properties': [
        'error',
        { object: 'Date', property: 'now', message: 'workflows must not read the wall clock' },
        { object: 'Math', property: 'random', message: 'workflows must not use Math.random' },
      ],
      'no-restricted-globals': ['error', 'setTimeout', 'setInterval', 'process', 'fetch'],
    },
  },
  {
    files: ['eslint.config.js'],
    ...tseslint.configs.disableTypeChecked,
  },
);
