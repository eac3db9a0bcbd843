"""The aggregation side."""
