"""The policy gate: Cedar policies over the case, agent and provider registries."""
