"""The OpenAI gateway (docs/gateway.md): one HAProxy per host that routes by the body's model name."""
