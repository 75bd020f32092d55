"""Model files that ship with the intake (see NOTICE for their origin and licence)."""
