"""The data-site side: what a site operator runs next to its model and data."""
