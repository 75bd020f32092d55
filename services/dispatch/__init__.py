"""Dispatch: provider registry view, dispatch ledger, transports."""
