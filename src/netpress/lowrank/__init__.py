"""netpress.lowrank."""
