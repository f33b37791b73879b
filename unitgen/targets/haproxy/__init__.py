"""HAProxy as the OpenAI gateway: its configuration, for every target."""
