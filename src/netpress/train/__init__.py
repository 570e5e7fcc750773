"""netpress.train."""
