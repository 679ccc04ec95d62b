"""The OpenAI-compatible HTTP server: protocol models, errors, chat templates, streaming, metrics, the traffic recorder."""
