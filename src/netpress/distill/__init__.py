"""netpress.distill."""
