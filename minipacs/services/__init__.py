"""DIMSE service handlers, one module per service."""
