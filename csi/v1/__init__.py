"""Generated CSI v1 bindings. DO NOT EDIT: regenerate with `make proto`."""
