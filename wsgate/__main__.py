"""Command line (placeholder, replaced below)."""
def main() -> None:
    raise SystemExit("not yet")
