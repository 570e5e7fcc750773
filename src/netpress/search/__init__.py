"""netpress.search."""
