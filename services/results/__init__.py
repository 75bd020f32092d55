"""Results: inbound channels, normalization, per-probe tracking, examiner review."""
