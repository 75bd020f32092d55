"""Provider transports behind one small interface (``base.ProviderTransport``)."""
