# syntax=docker/dockerfile:1
# Mailgent runs from source with tsx (no build step); the worker bundles its workflows at start.

# Production dependencies only, installed where a compiler toolchain is not needed at run time.
FROM node:20-bookworm-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund && npm cache clean --force

FROM node:20-bookworm-slim AS runtime
ENV NODE_ENV=production \
    HOST=0.0.0.0 \
    PORT=8080 \
    DATA_DIR=/var/lib/mailgent \
    ENV_FILES_ROOT=/var/lib/mailgent/env-files
WORKDIR /app
COPY --from=deps /app/node_modules ./node_modules
COPY . .
# The image's own "node" user (uid 1000) owns only the state directory; the code stays root-owned and read-only to it.
RUN mkdir -p /var/lib/mailgent/env-files && chown -R node:node /var/lib/mailgent && chmod 0700 /var/lib/mailgent
USER node
EXPOSE 8080
# Liveness of the API (the worker's service disables it in docker-compose.yml: it serves no HTTP).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.PORT || 8080) + '/healthz').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["node", "bin/mailgent.js"]
CMD ["api"]
