-- Up Migration

-- How an identity's MCP calls treat secret values. With masking on (the default) vault_get over MCP
-- answers a handle and metadata, so values stay out of the agent model's context; an explicit
-- unmasked read (reveal) needs allow_unmasked_read, which only the admin sets.
ALTER TABLE identities
  ADD COLUMN mcp_masking          boolean NOT NULL DEFAULT true,
  ADD COLUMN allow_unmasked_read  boolean NOT NULL DEFAULT false;
