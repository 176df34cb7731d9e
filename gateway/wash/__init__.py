"""Wash bays: the pure bay state machine and the core service that drives the PLCs."""
