"""The node side every backend shares: format, mount, bind, unmount."""
