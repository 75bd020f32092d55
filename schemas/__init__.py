"""The contract: event models, topic catalog, envelope codec, exporters."""
