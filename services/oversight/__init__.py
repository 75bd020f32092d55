"""Usage oversight: patterns of use over windows (faust-streaming), published as UsageAlert."""
