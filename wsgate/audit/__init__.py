"""The audit log (SPEC §5): what is recorded, how it is written, chained, signed and queried."""
