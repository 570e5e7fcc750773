"""netpress.report."""
